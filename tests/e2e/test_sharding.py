"""Sharded training (train.sharding / teacher.sharding: fsdp) on two CPU processes over gloo."""

from __future__ import annotations

import contextlib
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
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mmopd import ConfigError, train
from mmopd.models.checkpoint import complete_checkpoints
from mmopd.run.report import read_metrics
from modalities.image_tokens import toy as image_toy
from modalities.vlm import toy as vlm_toy

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
@pytest.mark.parametrize("kind, options", [("supervised_kd", {}), ("on_policy", {}),
                                           ("supervised_kd", {"student.gradient_checkpointing": True})],
                         ids=["supervised_kd", "on_policy", "activation_checkpointing_per_layer"])
def test_two_process_fsdp_run_matches_one_unsharded_process_at_the_same_global_batch(text_config, tmp_path, kind,
                                                                                    options):
    settings = {"train.steps": 3, "train.batch_size": 2, "objective.kind": kind, "train.lr": 1e-3,
                "rollout.max_new_tokens": 8}
    train(text_config(**settings, **{"train.grad_accum": 2, "train.out_dir": str(tmp_path / "one")}))
    sharded = text_config(**settings, **SHARDED, **options,
                          **{"train.grad_accum": 1, "train.out_dir": str(tmp_path / "two")})
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
    if options:  # each decoder layer recomputes its activations in backward (HF's checkpointing, inside FSDP)
        assert "activation checkpointing in 2 of its 2 decoder layers" in proc.stderr
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


def _node(rank: int, port: int, config: Path, log: Path, overrides: list[str]) -> subprocess.Popen:
    """One of two simulated machines: a torchrun launcher of one process, meeting the other at a c10d rendezvous on
    127.0.0.1 (`--node_rank` is only a hint there: ranks go by arrival). A session of its own, as a machine is."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "mmopd.cli",
                             "train", str(config), *overrides], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _two_nodes(config: Path, logs: Path, second: list[str] | None = None) -> list[subprocess.Popen]:
    """Both machines of a run, the second with its own `second` overrides."""
    port = int(_port()[1])
    return [_node(rank, port, config, logs / f"node{rank}.log", overrides)
            for rank, overrides in ((0, []), (1, second or []))]


def _machine_dies(node: subprocess.Popen) -> None:
    """SIGKILL a simulated machine: its launcher and the processes under it (torchrun starts each worker in a session
    of its own, so the launcher's process group does not hold them)."""
    pids = [node.pid]
    for pid in pids:  # grows as it goes: children, then theirs
        with contextlib.suppress(OSError):
            pids += [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_nodes_train_sharded_survive_a_killed_node_and_resume_to_the_one_node_run(text_config, tmp_path):
    """Two torchrun launchers on 127.0.0.1 stand for two machines. One machine dies (its launcher and its process,
    SIGKILL) after step 3: the other's process stops in one line within seconds, naming the intact checkpoint;
    both launched again, the run resumes from it and ends as the uninterrupted one-machine run of two processes, to
    the bit (gloo's reductions over 2 ranks are the same wherever the ranks run)."""
    settings = {"train.steps": 6, "train.save_every": 2, "train.batch_size": 2, "objective.kind": "supervised_kd",
                "train.lr": 1e-3, **SHARDED}
    reference = text_config(**settings, **{"train.out_dir": str(tmp_path / "reference")})
    assert subprocess.run(_launch("-m", "mmopd.cli", "train", str(_write(reference, tmp_path / "r.yaml"))),
                          cwd=ROOT, capture_output=True, env=ENV, timeout=600).returncode == 0
    out = tmp_path / "nodes"
    path = _write(text_config(**settings, **{"train.out_dir": str(out)}), tmp_path / "n.yaml")
    nodes = _two_nodes(path, tmp_path)
    try:  # step-2 is complete once step 3 is logged; steps 3+ are not all saved
        while not (out / "metrics.jsonl").exists() or len(_train_rows(out)) < 3:
            assert all(node.poll() is None for node in nodes), "the run ended before a node could be killed"
            time.sleep(0.05)
        killed = next(i for i, node in enumerate(nodes) if "rank 1 holds" in (tmp_path / f"node{i}.log").read_text())
        _machine_dies(nodes[killed])
        died = time.monotonic()
        survivor = nodes[1 - killed]
        survivor.wait(timeout=120)
        waited = time.monotonic() - died
    finally:
        for node in nodes:
            _machine_dies(node)
            node.wait()
    log = (tmp_path / f"node{1 - killed}.log").read_text()
    assert survivor.returncode != 0 and waited < 60, log[-3000:]  # far below train.collective_timeout (1800 s)
    stopped = [line for line in log.splitlines() if line.startswith("mmopd: ")]
    saved = complete_checkpoints(out)[-1]
    assert saved.name in ("step-2", "step-4")
    assert len(stopped) == 1 and re.search(r"mmopd: stopped: rank 0 \(host .*\) of 2 lost the run's other processes "
                                           rf"\(.*\): one died .* {saved}, is intact; relaunch every node",
                                           stopped[0]), log[-3000:]
    assert "[rank0]: Traceback" not in log  # the launcher's own traceback (it lost the rendezvous) is torchrun's
    assert not (out / ".lock").exists()  # rank 0 survived and let go of the directory
    nodes = _two_nodes(path, tmp_path)
    for i, node in enumerate(nodes):
        assert node.wait(timeout=600) == 0, (tmp_path / f"node{i}.log").read_text()[-3000:]
    want, got = _train_rows(tmp_path / "reference"), _train_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]
    want, got = (load_file(str(run / "checkpoints/step-6/model/model.safetensors"))
                 for run in (tmp_path / "reference", out))
    assert want.keys() == got.keys() and all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.slow
def test_machines_launched_with_other_settings_are_refused_on_every_one_in_one_line(text_config, tmp_path):
    path = _write(text_config(**SHARDED, **{"train.out_dir": str(tmp_path / "run")}), tmp_path / "c.yaml")
    nodes = _two_nodes(path, tmp_path, second=["train.lr=0.001"])
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            _machine_dies(node)
            node.wait()
    for i, code in enumerate(codes):
        log = (tmp_path / f"node{i}.log").read_text()
        said = [line for line in log.splitlines() if line.startswith("mmopd: ")]
        assert code != 0 and "[rank" not in log and len(said) == 1, log[-3000:]  # no worker's traceback
        assert re.match(r"mmopd: error: rank 1 \(host .*\) was launched with other settings than rank 0 \(host .*\): "
                        r"train.lr (0.0001 on rank 0, 0.001 here|0.001 on rank 0, 0.0001 here)\. Launch every node "
                        "with the same config file, overrides and environment$", said[0]), said[0]
    assert os.listdir(tmp_path / "run") == []  # rank 0 let go of the directory it locked


@pytest.mark.slow
def test_a_lora_student_sharded_on_two_processes_matches_one_process_and_saves_merged_weights(text_config,
                                                                                              tmp_path):
    settings = {"train.steps": 3, "train.batch_size": 2, "objective.kind": "supervised_kd", "train.lr": 1e-2,
                "student.trainable": "lora", "student.lora_rank": 4}
    train(text_config(**settings, **{"train.grad_accum": 2, "train.out_dir": str(tmp_path / "one")}))
    sharded = text_config(**settings, **SHARDED, **{"train.grad_accum": 1, "train.out_dir": str(tmp_path / "two")})
    proc = subprocess.run(_launch("-m", "mmopd.cli", "train", str(_write(sharded, tmp_path / "two.yaml"))),
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
    # model/ is the merged student (plain, loads by path), lora/ the adapters, as an unsharded LoRA run saves them
    for part, load in (("model", lambda d: AutoModelForCausalLM.from_pretrained(d).state_dict()),
                       ("lora", lambda d: load_file(str(d / "adapter_model.safetensors")))):
        want, got = (load(tmp_path / run / "checkpoints/step-3" / part) for run in ("one", "two"))
        assert want.keys() == got.keys() and want, part
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=f"{part}: {name}")
    base = AutoModelForCausalLM.from_pretrained(sharded.student.path).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "two/checkpoints/step-3/model").state_dict()
    assert any(not torch.equal(merged[name], base[name]) for name in base)  # the adapters are folded in


def _back_to_step_2(out: Path) -> None:
    """A finished 4-step run as if it had stopped after its step-2 checkpoint (the same schedule either way)."""
    shutil.rmtree(out / "checkpoints/step-4")
    (out / "summary.json").unlink()


@pytest.mark.slow
def test_a_sharded_run_resumes_on_one_process_and_an_unsharded_one_on_two_at_the_same_global_batch(text_config,
                                                                                                  tmp_path):
    settings = {"train.batch_size": 2, "objective.kind": "supervised_kd", "train.lr": 1e-3, "train.save_every": 2}
    one_process = {"train.grad_accum": 2, "train.sharding": "none", "teacher.sharding": "none"}
    reference = tmp_path / "reference"
    train(text_config(**settings, **one_process, **{"train.steps": 4, "train.out_dir": str(reference)}))
    # 2 -> 1: two sharded processes train; one unsharded process resumes from their step-2 DCP optimizer shards
    two = _write(text_config(**settings, **SHARDED, **{"train.steps": 4, "train.out_dir": str(tmp_path / "2to1")}),
                 tmp_path / "two.yaml")
    proc = subprocess.run(_launch("-m", "mmopd.cli", "train", str(two)), cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _back_to_step_2(tmp_path / "2to1")
    train(text_config(**settings, **one_process, **{"train.steps": 4, "train.out_dir": str(tmp_path / "2to1")}))
    # 1 -> 2: the reference's step-2 checkpoint (its optimizer whole in trainer_state.pt) resumes sharded
    shutil.copytree(reference, tmp_path / "1to2")
    _back_to_step_2(tmp_path / "1to2")
    path = _write(text_config(**settings, **SHARDED, **{"train.steps": 4, "train.out_dir": str(tmp_path / "1to2")}),
                  tmp_path / "1to2.yaml")
    proc = subprocess.run(_launch("-m", "mmopd.cli", "train", str(path)), cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _train_rows(reference)
    for resumed in ("2to1", "1to2"):
        got = _train_rows(tmp_path / resumed)
        assert [r["step"] for r in got] == [1, 2, 3, 4], resumed
        for a, b in zip(want, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (resumed, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (resumed, a["step"])


def test_a_resume_that_changes_the_global_batch_is_refused(text_config, tmp_path):
    settings = {"train.save_every": 1, "train.out_dir": str(tmp_path / "run"), "rollout.max_new_tokens": 2}
    train(text_config(**settings, **{"train.steps": 1, "train.batch_size": 2}))
    with pytest.raises(ConfigError, match=r"global batch of 2 records a step, and this run's is 4 \(train.batch_size "
                                          r"4 × train.grad_accum 1 × 1 process\).*train.batch_size × "
                                          r"train.grad_accum to 2"):
        train(text_config(**settings, **{"train.steps": 2, "train.batch_size": 4}))


TOYS = {"vlm": lambda out: vlm_toy.build_toy(out, progress=False, size=vlm_toy.TINY),
        "image_tokens": lambda out: image_toy.build_toy(out, progress=False, size=image_toy.TINY)}


@pytest.mark.slow
@pytest.mark.parametrize("modality", sorted(TOYS))
def test_the_vlm_and_image_token_toys_train_sharded_on_two_processes(tmp_path, modality):
    path = TOYS[modality](tmp_path / "toy")
    out = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in SHARDED.items()] + [
        "train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.save_every=0", f"train.out_dir={out}"]
    proc = subprocess.run(_launch("-m", "mmopd.cli", "train", str(path), *overrides), cwd=ROOT, capture_output=True,
                          text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _train_rows(out)] == [1, 2]
    assert len(re.findall(r"rank \d holds [\d.]+ MB of the (?:student|teacher)'s", proc.stderr)) == 4
    assert (out / "checkpoints/step-2/model/config.json").is_file()


UNEVEN = """
import sys
import torch
from accelerate import Accelerator
from mmopd.models.adapter import PolicySide, get_adapter
from mmopd.step.batch import Sampling
from mmopd.engines.hf import rollout
from mmopd.models.sharding import shard

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
adapter = get_adapter("text")
processor = adapter.load_processor(sys.argv[1], "student")
model = shard(adapter.calls.load_model(sys.argv[1], "student", torch.float32), accelerator.device, trainable=False)
space = adapter.token_space(processor, model)
prompts = adapter.encode_prompts([{"prompt": "1+1="}] * (1 + rank), processor)
# rank 0 ends at its first token (every token is an EOS), rank 1 never ends: rank 0 must keep stepping
eos = list(range(len(processor))) if rank == 0 else [len(processor) + 7]
out = rollout(PolicySide(adapter, model, processor, space, eos, 0), prompts, 12, Sampling(temperature=1.0),
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


def test_cpu_offload_is_refused_on_a_machine_without_a_gpu(text_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: offload runs there")
    with pytest.raises(ConfigError, match="train.fsdp_cpu_offload keeps a sharded GPU student's .* clear it"):
        train(text_config(**{"train.sharding": "fsdp", "train.fsdp_cpu_offload": True}))


@pytest.mark.parametrize("overrides, message", [
    ({"train.sharding": "fsdp", "student.trainable": "lora", "rollout.engine": "vllm"},
     "student.trainable=lora with train.sharding=fsdp samples with rollout.engine=hf only"),
    ({"train.sharding": "fsdp", "rollout.engine": "vllm"}, "rollout.engine=vllm with train.sharding=fsdp samples "
                                                           "from a served engine only: set rollout.url"),
    ({"train.fsdp_cpu_offload": True}, "train.fsdp_cpu_offload offloads a sharded student"),
    ({"teacher.sharding": "zero3"}, "teacher.sharding is 'zero3', which is not one of none, fsdp"),
])
def test_sharding_settings_that_cannot_run_are_refused_at_the_config(text_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        text_config(**overrides)
