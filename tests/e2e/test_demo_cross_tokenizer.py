"""`mmopd demo text --family cross_tokenizer` end to end, as a user runs it, at a reduced size: the toy's teacher
reads characters, its student column sums ("13;"), and the demo distils through the character-span alignment with
the sampled span estimator. Whether it closes the gap is the full demo's to show (README: 0.234 -> 0.720 in 200
steps, seed 0; the toy alone needs minutes of SFT); this holds the plumbing: toy, detection at start, training, the
one-to-one and canonical shares logged, the report."""

from __future__ import annotations

import json

import pytest
import yaml

from mmopd.cli import main
from modalities.text import toy

pytestmark = pytest.mark.slow  # a whole demo, if a small one


def test_the_cross_tokenizer_demo_runs_end_to_end_at_a_reduced_size(tmp_path, monkeypatch, capsys):
    for name, value in {"TRAIN_RECORDS": 400, "EVAL_RECORDS": 16, "TEACHER_STEPS": 10, "STUDENT_STEPS": 5,
                        "BATCH_SIZE": 16, "WARMUP": 2}.items():
        monkeypatch.setattr(toy, name, value)
    out = tmp_path / "demo"
    assert main(["demo", "text", "--family", "cross_tokenizer", "--out", str(out), "train.progress=false",
                 "train.steps=3", "train.batch_size=2", "train.eval_every=0", "train.save_every=0",
                 "train.warmup=0"]) == 0
    assert "[2/2] on-policy distillation" in capsys.readouterr().out
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["objective"]["estimator"] == "sampled" and config["rollout"]["samples_per_prompt"] == 4
    run = out / "runs" / "on_policy"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(0 < r["cross_tokenizer/one_to_one_share"] <= 1 for r in steps)
    assert all(0 <= r["cross_tokenizer/canonical_share"] <= 1 for r in steps)
    summary = json.loads((run / "summary.json").read_text())
    assert {"teacher", "student_before", "student_after"} <= set(summary)
