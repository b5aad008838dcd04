"""End to end: `mmopd demo image` builds the toy (VQ, CFG teacher, weak student, judge), distils the unguided
student from the guided teacher on-policy, and the student draws the asked class far more often after.

At a reduced size: the demo's toy as it is (most of the cost), then half the demo's 300 steps (the cosine schedule
compressed to them), scored on 240 of the 600 eval pictures. `make demos` runs the full demo against the README's
table."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmopd.cli import main

pytestmark = pytest.mark.slow  # each test runs a whole demo or benchmark: minutes
STEPS = 150


def test_image_demo_distils_the_guided_teacher_into_a_faster_unguided_student(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the test cores are often shared
    try:
        assert main(["demo", "image", "train.progress=false", "--out", str(tmp_path), f"train.steps={STEPS}",
                     "data.eval_limit=240"]) == 0
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "runs" / "cfg_distillation"
    summary = json.loads((run / "summary.json").read_text())
    pictures = summary["pictures"]
    assert summary["metric"] == "classifier_accuracy" and summary["steps"] == STEPS
    assert pictures["eval_pictures"] == 240
    assert summary["teacher"] > 0.8  # the guided teacher draws what is asked
    assert summary["student_after"] > summary["student_before"] + 0.2
    assert pictures["fid"]["student_after"] < pictures["fid"]["student_before"]
    assert pictures["heldout_reverse_kl"]["student_after"] < 0.75 * pictures["heldout_reverse_kl"]["student_before"]
    assert pictures["classifier_accuracy"]["teacher"] >= pictures["classifier_accuracy"]["teacher_unguided"]
    assert pictures["student_speedup_over_guided_teacher"] > 1.5
    grid = Image.open(run / "samples.png")
    assert grid.size[1] == 6 * 3 * (16 * 4 + 2)  # three rows per class
    assert (run / "plots" / "train.png").is_file() and (run / "metrics.jsonl").is_file()
