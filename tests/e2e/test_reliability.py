"""Crashes lose nothing: SIGKILL and SIGTERM mid-run, non-finite steps, and a 2-process run."""

from __future__ import annotations

import math
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

import mmopd.run.trainer as trainer
from mmopd import train
from mmopd.models.checkpoint import complete_checkpoints
from mmopd.run.report import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _write_config(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _train_rows(out_dir: Path) -> list[dict]:
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _port() -> list[str]:
    """A free rendezvous port, so two-process runs in parallel test workers never meet."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return ["--main_process_port", str(sock.getsockname()[1])]


def _mmopd(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmopd.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


SETTINGS = {"train.steps": 8, "train.save_every": 2, "train.eval_every": 0, "rollout.max_new_tokens": 10,
            "train.batch_size": 8}


@pytest.fixture
def reference(text_config, tmp_path) -> list[dict]:
    """The uninterrupted run's per-step metrics."""
    train(text_config(**SETTINGS, **{"train.out_dir": str(tmp_path / "reference")}))
    return _train_rows(tmp_path / "reference")


def _assert_same_curve(reference: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in reference]
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]


@pytest.mark.slow
def test_sigkill_between_checkpoints_resumes_to_the_same_curve(text_config, tmp_path, reference):
    out = tmp_path / "killed"
    path = _write_config(text_config(**SETTINGS, **{"train.out_dir": str(out)}), tmp_path / "c.yaml")
    proc = _mmopd("train", str(path))
    # kill once step 5 is logged: checkpoint step-4 is complete, steps 5+ are not saved
    _wait_for(lambda: len(_train_rows(out)) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in complete_checkpoints(out)][-1] in ("step-4", "step-6")
    resumed = _mmopd("train", str(path))
    assert resumed.wait() == 0, resumed.communicate()[0]
    _assert_same_curve(reference, _train_rows(out))


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_whole(text_config, tmp_path, reference):
    out = tmp_path / "torn"
    config = text_config(**SETTINGS, **{"train.out_dir": str(out)})
    # a child process that SIGKILLs itself inside save_checkpoint for step 4, after the files, before the rename
    script = f"""
import os, signal, yaml
import mmopd.models.checkpoint as ck
from mmopd.config import config_from_dict
from mmopd.run.trainer import train
real = ck.os.replace
def replace(src, dst):
    if str(dst).endswith("step-4"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
ck.os.replace = replace
train(config_from_dict(yaml.safe_load(open({str(_write_config(config, tmp_path / 'c.yaml'))!r}))))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["step-2"]
    assert any(p.name.startswith(".tmp-step-4") for p in (out / "checkpoints").iterdir())
    resumed = _mmopd("train", str(tmp_path / "c.yaml"))
    assert resumed.wait() == 0, resumed.communicate()[0]
    _assert_same_curve(reference, _train_rows(out))
    assert [p.name for p in complete_checkpoints(out)] == ["step-2", "step-4", "step-6", "step-8"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, said", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT: saved checkpoint")])
def test_sigterm_and_a_first_ctrl_c_save_a_checkpoint_and_exit_cleanly(text_config, tmp_path, sig, said):
    out = tmp_path / "run"
    path = _write_config(text_config(**{**SETTINGS, "train.steps": 200, "train.save_every": 0},
                                     **{"train.out_dir": str(out)}), tmp_path / "c.yaml")
    proc = _mmopd("train", str(path))
    _wait_for(lambda: len(_train_rows(out)) >= 2, proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "Traceback" not in output and said in output
    saved = complete_checkpoints(out)
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) == len(_train_rows(out))


def test_non_finite_steps_are_skipped_counted_and_abort_after_five(text_config, tmp_path, monkeypatch):
    real = trainer.objective_step
    calls = {"n": 0}
    poisoned = {2, 3}

    def poisoning(m, records, plan, generator, timer, backward):
        calls["n"] += 1
        bad = calls["n"] in poisoned
        return real(m, records, plan, generator, timer, lambda loss: backward(loss * math.nan if bad else loss))

    monkeypatch.setattr(trainer, "objective_step", poisoning)
    summary = train(text_config(**{"train.steps": 4, "train.out_dir": str(tmp_path / "a")}))
    assert summary["skipped_steps"] == 2
    rows = _train_rows(tmp_path / "a")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2]

    calls["n"] = 0
    poisoned.clear()
    poisoned.update(range(3, 100))
    out = tmp_path / "b"
    with pytest.raises(trainer.TrainingAborted, match="5 non-finite steps in a row"):
        train(text_config(**{"train.steps": 20, "train.save_every": 2, "train.out_dir": str(out)}))
    saved = complete_checkpoints(out)
    assert [p.name for p in saved] == ["step-2", "step-4", "step-6"]  # skipped steps change nothing
    weights = [torch.load(p / "trainer_state.pt", weights_only=False)["step"] for p in saved]
    assert weights == [2, 4, 6]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["supervised_kd", "on_policy"])
def test_two_process_gloo_run_matches_one_process_at_the_same_global_batch(text_config, tmp_path, kind):
    settings = {"train.steps": 3, "train.batch_size": 2, "train.eval_every": 0, "objective.kind": kind,
                "train.lr": 1e-3, "rollout.max_new_tokens": 8}
    single = text_config(**settings, **{"train.grad_accum": 2, "train.out_dir": str(tmp_path / "one")})
    train(single)
    double = text_config(**settings, **{"train.grad_accum": 1, "train.out_dir": str(tmp_path / "two")})
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           *_port(), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmopd.cli", "train",
                           str(_write_config(double, tmp_path / "two.yaml"))],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    # sampled rollouts can flip on float noise once weights differ in the last bits, so on-policy
    # compares the first step exactly and the curve loosely; teacher-forced KD compares every step
    exact = one if kind == "supervised_kd" else one[:1]
    for a, b in zip(exact, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.2), a["step"]


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_stops_every_rank_at_the_same_step_with_a_checkpoint(text_config, tmp_path):
    out = tmp_path / "term2"
    config = text_config(**{**SETTINGS, "train.steps": 200, "train.save_every": 0, "train.batch_size": 2},
                         **{"train.out_dir": str(out)})
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    # a new session: SIGTERM goes to the launcher and both workers at once, as a cluster scheduler sends it
    proc = subprocess.Popen([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             *_port(), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmopd.cli", "train",
                             str(_write_config(config, tmp_path / "c.yaml"))], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for(lambda: len(_train_rows(out)) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    saved = complete_checkpoints(out)
    assert len(saved) == 1, output[-3000:]
    assert int(saved[0].name.split("-")[1]) == len(_train_rows(out)) < 200
    assert "SIGTERM: saved checkpoint" in output


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_accelerates_sharding_plugins_are_refused_pointing_to_train_sharding(kind, text_config):
    from accelerate import DistributedType

    class Sharded:
        distributed_type = DistributedType[kind]
        num_processes = 8

    with pytest.raises(trainer.ConfigError, match=f"{DistributedType[kind].value}.*launch --multi_gpu.*"
                                                  "train.sharding=fsdp"):
        trainer.check_distributed(Sharded(), text_config())
    plain = type("Plain", (), {"distributed_type": DistributedType.MULTI_GPU, "num_processes": 2})()
    trainer.check_distributed(plain, text_config(**{"train.sharding": "fsdp"}))


def test_sharding_on_one_process_is_refused(text_config):
    from accelerate import DistributedType

    alone = type("Alone", (), {"distributed_type": DistributedType.NO, "num_processes": 1})()
    with pytest.raises(trainer.ConfigError, match="teacher.sharding=fsdp shards over processes, but this is one"):
        trainer.check_distributed(alone, text_config(**{"teacher.sharding": "fsdp"}))


def test_the_non_finite_abort_advice_is_a_command_that_resumes(text_config, tmp_path, monkeypatch):
    real = trainer.objective_step
    poisoned = {"lr": 1e-4}  # the run's train.lr: steps poison their loss while it is above 1e-5

    def poisoning(m, records, plan, generator, timer, backward):
        return real(m, records, plan, generator, timer,
                    lambda loss: backward(loss * math.nan if poisoned["lr"] > 1e-5 else loss))

    monkeypatch.setattr(trainer, "objective_step", poisoning)
    settings = {"train.steps": 8, "train.save_every": 1, "train.out_dir": str(tmp_path / "run"), "train.lr": 1e-4}
    train(text_config(**{**settings, "train.steps": 1}))  # one good step, saved
    with pytest.raises(trainer.TrainingAborted) as aborted:
        train(text_config(**settings))
    advice = re.search(r"train\.lr=(\S+) 'train\.resume_changes=\[train\.lr\]'", str(aborted.value))
    assert advice, aborted.value
    lr = poisoned["lr"] = float(advice.group(1))
    summary = train(text_config(**{**settings, "train.lr": lr, "train.resume_changes": ["train.lr"]}))
    assert summary["steps"] == 8
    rows = _train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9)) and math.isfinite(rows[-1]["loss"])
    assert rows[-1]["skipped_steps"] == summary["skipped_steps"] < 8  # the resumed steps all updated


def test_a_second_ctrl_c_aborts_at_once():
    stop = {"signal": None}
    restore = trainer._listen_for_stop(stop)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop["signal"] == signal.SIGINT  # the first only asks the loop to save and stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
