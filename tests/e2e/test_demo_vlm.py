"""End to end, as a user runs it: `mmopd demo vlm` builds the shapes-VQA toy (a trained teacher, a
student sharing its vision side with half its language layers), distils on-policy, and the student
improves. Run at half the demo's steps to keep the suite fast."""

from __future__ import annotations

import json

import pytest

from mmopd.cli import main

pytestmark = pytest.mark.slow  # each test runs a whole demo or benchmark: minutes


def test_vlm_demo_closes_most_of_the_teacher_student_gap(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "vlm", "--out", str(out), "train.progress=false", "train.steps=500",
                 "train.eval_every=250"]) == 0
    printed = capsys.readouterr().out
    run = out / "runs" / "on_policy"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "accuracy"
    assert summary["teacher"] >= 0.8, summary  # a trained teacher, not a random one
    assert summary["teacher"] - summary["student_before"] >= 0.3, summary  # a real gap to close
    assert summary["gap_closed"] >= 0.5, summary  # measured at 500 steps: 0.365 -> 0.835, teacher 0.895
    assert "student after" in printed and "gap closed" in printed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 500
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 250, 500]
    for name in ("train.png", "eval.png", "answers.png"):
        assert (run / "plots" / name).stat().st_size > 10_000
