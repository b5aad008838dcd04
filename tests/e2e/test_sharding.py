"""Sharded training (train.sharding / teacher.sharding: fsdp) on two CPU processes over gloo."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mmopd import train
from mmopd.checkpoint import complete_checkpoints
from mmopd.report import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SHARDED = {"train.sharding": "fsdp", "teacher.sharding": "fsdp"}


def _port() -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return ["--main_process_port", str(sock.getsockname()[1])]


def _launch(*args: str) -> list[str]:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    return [launcher, "launch", "--config_file", str(ROOT / "configs/accelerate/ddp_cpu_2proc.yaml"), *_port(), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _write(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["supervised_kd", "on_policy"])
def test_two_process_fsdp_run_matches_one_unsharded_process_at_the_same_global_batch(text_config, tmp_path, kind):
    settings = {"train.steps": 3, "train.batch_size": 2, "objective.kind": kind, "train.lr": 1e-3,
                "rollout.max_new_tokens": 8}
    train(text_config(**settings, **{"train.grad_accum": 2, "train.out_dir": str(tmp_path / "one")}))
    sharded = text_config(**settings, **SHARDED, **{"train.grad_accum": 1, "train.out_dir": str(tmp_path / "two")})
    proc = subprocess.run(_launch("-m", "mmopd.cli", "train", str(_write(sharded, tmp_path / "two.yaml"))),
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    exact = one if kind == "supervised_kd" else one[:1]  # on-policy: rollouts may flip on float noise later
    for a, b in zip(exact, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]  # the global norm
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.2), a["step"]
    # each rank holds about half of each model's parameter bytes
    held = re.findall(r"rank (\d) holds ([\d.]+) MB of the (\w+)'s ([\d.]+) MB", proc.stderr)
    assert sorted((rank, role) for rank, _, role, _ in held) == [("0", "student"), ("0", "teacher"),
                                                                ("1", "student"), ("1", "teacher")]
    for _, local, _, full in held:
        assert float(local) == pytest.approx(float(full) / 2, rel=0.1)
    # the checkpoint is one plain model that transformers loads as it is
    saved = tmp_path / "two/checkpoints/step-3/model"
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    if kind == "supervised_kd":  # the same three updates as the unsharded run
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one/checkpoints/step-3/model")
        for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_sigkilled_sharded_run_resumes_to_the_uninterrupted_curve(text_config, tmp_path):
    settings = {"train.steps": 6, "train.save_every": 2, "train.batch_size": 2, "objective.kind": "supervised_kd",
                "train.lr": 1e-3, **SHARDED}
    reference = text_config(**settings, **{"train.out_dir": str(tmp_path / "reference")})
    assert subprocess.run(_launch("-m", "mmopd.cli", "train", str(_write(reference, tmp_path / "r.yaml"))),
                          cwd=ROOT, capture_output=True, env=ENV, timeout=600).returncode == 0
    out = tmp_path / "killed"
    path = _write(text_config(**settings, **{"train.out_dir": str(out)}), tmp_path / "k.yaml")
    proc = subprocess.Popen(_launch("-m", "mmopd.cli", "train", str(path)), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:  # kill both ranks once step 3 is logged: step-2 is complete, steps 3+ are not all saved
        while not (out / "metrics.jsonl").exists() or len(_train_rows(out)) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in complete_checkpoints(out)][-1] in ("step-2", "step-4")
    resumed = subprocess.run(_launch("-m", "mmopd.cli", "train", str(path)), cwd=ROOT, capture_output=True,
                             text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _train_rows(tmp_path / "reference"), _train_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]


UNEVEN = """
import sys
import torch
from accelerate import Accelerator
from mmopd.adapter import get_adapter
from mmopd.batch import Sampling
from mmopd.engines.hf import rollout
from mmopd.sharding import shard

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
adapter = get_adapter("text")
processor = adapter.load_processor(sys.argv[1], "student")
model = shard(adapter.load_model(sys.argv[1], "student", torch.float32), accelerator.device, trainable=False)
space = adapter.token_space(processor, model)
prompts = adapter.encode_prompts([{"prompt": "1+1="}] * (1 + rank), processor)
# rank 0 ends at its first token (every token is an EOS), rank 1 never ends: rank 0 must keep stepping
eos = list(range(len(processor))) if rank == 0 else [len(processor) + 7]
out = rollout(adapter, model, prompts, space, eos, 0, 12, Sampling(temperature=1.0),
              torch.Generator().manual_seed(rank))
print(f"rank {rank} tokens {tuple(out.tokens.shape)} kept {int(out.mask.sum())}", flush=True)
"""


@pytest.mark.slow
def test_uneven_rollout_lengths_across_ranks_do_not_hang(tiny_text, tmp_path):
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN)
    proc = subprocess.run(_launch(str(script), str(tiny_text["student"])), cwd=ROOT, capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 tokens (1, 12) kept 1" in proc.stdout
    assert "rank 1 tokens (2, 12) kept 24" in proc.stdout


@pytest.mark.parametrize("overrides, message", [
    ({"train.sharding": "fsdp", "student.trainable": "lora"}, "student.trainable=lora is not supported with train"),
    ({"train.sharding": "fsdp", "rollout.engine": "vllm"}, "rollout.engine=vllm cannot sync from a sharded"),
    ({"train.fsdp_cpu_offload": True}, "train.fsdp_cpu_offload offloads a sharded student"),
    ({"teacher.sharding": "zero3"}, "teacher.sharding is 'zero3', which is not one of none, fsdp"),
])
def test_sharding_settings_that_cannot_run_are_refused_at_the_config(text_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        text_config(**overrides)
