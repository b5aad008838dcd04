"""End to end, as a user runs it: `mmopd demo text` builds the toy task, distils, and the student improves."""

from __future__ import annotations

import json

import pytest

from mmopd.cli import main

pytestmark = pytest.mark.slow  # each test runs a whole demo or benchmark: minutes


def test_text_demo_closes_most_of_the_teacher_student_gap(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "text", "--out", str(out), "train.progress=false"]) == 0
    printed = capsys.readouterr().out
    run = out / "runs" / "on_policy"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "accuracy"
    assert summary["teacher"] >= 0.9, summary  # a trained teacher, not a random one
    assert summary["teacher"] - summary["student_before"] >= 0.3, summary  # a real gap to close
    assert summary["gap_closed"] >= 0.5, summary  # measured: 0.88 (0.314 -> 0.920, teacher 1.0)
    assert "student after" in printed and "gap closed" in printed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 200
    assert all(k in train_rows[0] for k in ("loss", "divergence", "lr", "tokens_per_s", "time/rollout",
                                            "time/teacher", "time/student"))
    assert sum(r["divergence"] for r in train_rows[-20:]) < sum(r["divergence"] for r in train_rows[:20])
    for name in ("train.png", "eval.png"):
        assert (run / "plots" / name).stat().st_size > 10_000
    assert (run / "checkpoints" / "step-200" / "COMPLETE").is_file()
