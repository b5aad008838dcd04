"""Every benchmark runs at a tiny size and prints its table with ratios against its baselines."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs a whole demo or benchmark: minutes

ROOT = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str, timeout: float = 900) -> str:  # a hang guard: ~1 min alone, 4x that on a loaded CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_loss_benchmark_prints_time_memory_and_ratios_to_the_floor_and_trl(tmp_path):
    text = _run("benchmarks.loss", "--n", "16", "--v", "64", "--h", "8", "--kinds", "jsd", "--reps", "1",
                "--methods", "floor,trl,ours_loss,liger", "--chunk", "16", "--json", str(tmp_path / "loss.json"))
    assert "| kind" in text and "vs floor" in text and "ours_loss" in text and "error" not in text
    assert "liger skipped" in text or "| liger" in text
    rows = json.loads((tmp_path / "loss.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"floor", "trl", "ours_loss"} and all(r["seconds"] > 0 for r in rows)


def test_rollout_benchmark_compares_with_generate():
    text = _run("benchmarks.rollout", "--model", "16,1,2,1,32,64", "--batch", "1,3", "--new", "2", "--reps", "1")
    assert "ours / generate" in text and len(re.findall(r"\d+\.\d+x\s+\|", text)) == 2


def test_step_benchmark_splits_the_step_and_compares_with_the_logits_path(tmp_path):
    text = _run("benchmarks.step", "--student", "16,1,2,1,32,64", "--teacher", "24,1,2,1,48,64", "--prompts", "2",
                "--prompt-len", "4", "--new", "2", "--steps", "1", "--variants", "logits,fused",
                "--json", str(tmp_path / "step.json"))
    assert "speed vs logits" in text and "error" not in text
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert rows["fused"]["tokens"] == 4 and set(rows["fused"]["split"]) == {"rollout", "sync", "teacher", "student"}


def test_step_benchmark_sharded_column_compares_fsdp_with_ddp_on_two_processes(tmp_path):
    text = _run("benchmarks.step", "--student", "16,1,2,1,32,64", "--teacher", "24,1,2,1,48,64", "--prompts", "2",
                "--prompt-len", "4", "--new", "2", "--steps", "1", "--variants", "", "--sharded", "2",
                "--json", str(tmp_path / "step.json"))
    assert "peak vs ddp" in text and "error" not in text
    assert len(re.findall(r"\| (ddp|fsdp) +\| \d+\.\d+ +\|", text)) == 2
    sharded = json.loads((tmp_path / "step.json").read_text())["sharded"]
    for layout in ("ddp", "fsdp"):  # both ranks report their memory; rank 0 its time
        assert len(sharded[layout]["ranks"]) == 2 and sharded[layout]["seconds"] > 0
        assert all(rank["peak"] > 0 for rank in sharded[layout]["ranks"])


def test_topk_benchmark_reports_error_against_the_exact_divergence(tiny_text):
    text = _run("benchmarks.topk", "--student", str(tiny_text["student"]), "--teacher", str(tiny_text["teacher"]),
                "--data", str(tiny_text["eval"]), "--prompts", "4", "--new", "3", "--k", "1,4", "--kinds", "jsd")
    assert "rel. error" in text and "| jsd" in text


def test_data_memory_benchmark_prints_peak_and_owned_memory_and_their_ratios_to_the_smallest_set():
    text = _run("benchmarks.data_memory", "--rows", "200,2000", "--steps", "20")
    assert "peak RSS MiB" in text and "peak owned vs 200" in text and "end owned vs 200" in text
    assert "| first " in text and "| cached " in text and "error" not in text
    assert len(re.findall(r"\d+\.\d+x\s+\|", text)) == 12  # 2 sizes x 2 runs x (peak RSS, peak owned, end owned)
