"""Shared fixtures: a tiny text task with a (random) teacher and student saved by path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmopd.config import load_config
from modalities.text import toy

pytest_plugins = ("tests.vlm.fixtures",)  # the VLM fixtures: tiny data and model pairs of every family


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (tiny models run fastest so, and the test cores are shared);
    modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, two tiny Qwen3 models (teacher wider than student) and train/eval JSONL."""
    return toy.build_untrained(tmp_path_factory.mktemp("tiny_text"))


@pytest.fixture
def text_config(tiny_text, tmp_path):
    """A factory of validated configs over the tiny text task, tiny enough to run in a second or two."""

    def make(**overrides):
        base = {
            "modality": "text",
            "student.path": str(tiny_text["student"]),
            "teacher.path": str(tiny_text["teacher"]),
            "data.train": str(tiny_text["train"]),
            "data.eval": str(tiny_text["eval"]),
            "rollout.max_new_tokens": 8,
            "train.steps": 2,
            "train.batch_size": 4,
            "train.eval_every": 0,
            "train.save_every": 0,
            "train.out_dir": str(tmp_path / "run"),
            "train.progress": False,
            "train.warmup": 0,
        }
        base.update(overrides)
        return load_config(None, base)

    return make
