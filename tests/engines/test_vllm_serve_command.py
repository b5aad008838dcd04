"""`mmopd serve teacher|rollout CONFIG`: the vLLM server command of each mode (the real servers it starts are the
shared servers of tests/engines/test_vllm_hidden_teacher.py, started through it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmopd.cli import main
from mmopd.config import load_config, save_config
from mmopd.engines.vllm.serve import API_SERVER, rollout_command, teacher_command
from mmopd.engines.vllm.served import POOLING_ARGS

BASE = {"modality": "text", "student.path": "/models/student", "teacher.path": "/models/teacher",
        "data.train": "train.jsonl", "teacher.engine": "vllm", "teacher.url": "http://127.0.0.1:8001"}


def _config(**overrides):
    return load_config(None, {**BASE, **overrides})


def _flag(args: tuple[str, ...], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("overrides, mode", [
    ({}, "hidden states"),  # the full estimator without teacher.top_k: the full distribution
    ({"teacher.top_k": 5, "teacher.tail": True}, "top-k"),
    ({"objective.estimator": "sampled"}, "token log-probs"),
])
def test_a_teacher_server_gets_the_flags_of_its_mode(overrides, mode):
    command = teacher_command(_config(**overrides), "127.0.0.1", 8001, cuda=False, extra=("--max-model-len", "64"))
    args = command.args
    assert args[:2] == API_SERVER and _flag(args, "--model") == "/models/teacher" and _flag(args, "--port") == "8001"
    assert _flag(args, "--dtype") == "float32" and command.env == {} and "--enable-lora" not in args
    assert (" ".join(POOLING_ARGS) in " ".join(args)) == (mode == "hidden states")
    assert _flag(args, "--max-logprobs") == ("5" if mode == "top-k" else None)
    assert args[-2:] == ("--max-model-len", "64")  # the caller's flags last: they win
    bf16 = teacher_command(_config(**overrides), "127.0.0.1", 8001, cuda=True).args
    assert _flag(bf16, "--dtype") == "bfloat16"  # dtype auto on a GPU, as the trainer's


def test_a_rollout_server_reloads_weights_and_a_lora_student_gets_the_next_rank_vllm_takes():
    full = rollout_command(_config(), Path("/engine"), "0.0.0.0", 8000, cuda=False)
    assert _flag(full.args, "--model") == "/engine" and _flag(full.args, "--logprobs-mode") == "processed_logprobs"
    assert full.env == {"VLLM_SERVER_DEV_MODE": "1"} and "--enable-lora" not in full.args
    lora = rollout_command(_config(**{"student.trainable": "lora", "student.lora_rank": 20}), Path("/engine"),
                           "0.0.0.0", 8000, cuda=False)
    assert "--enable-lora" in lora.args and _flag(lora.args, "--max-lora-rank") == "32"
    assert lora.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_mmopd_serve_prints_the_command_and_passes_what_follows_to_vllm(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    save_config(_config(), config)
    python = tmp_path / "python"
    python.write_text("")
    assert main(["serve", "teacher", str(config), "--port", "8123", "--python", str(python), "--dry-run", "--",
                 "--max-model-len", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{python} -m vllm.entrypoints.openai.api_server --model /models/teacher" in out
    assert "--port 8123" in out and out.split("\n")[0].endswith("--max-model-len 64")
    assert "set teacher.url: http://127.0.0.1:8123" in out


def test_mmopd_serve_without_a_vllm_interpreter_is_one_line(tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.yaml"
    save_config(_config(), config)
    monkeypatch.setenv("MMOPD_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    assert main(["serve", "teacher", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no vLLM interpreter" in err and "make vllm-env" in err
