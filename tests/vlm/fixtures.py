"""Fixtures for the VLM tests: tiny shapes-VQA data and tiny teacher/student pairs of every family,
saved by path (built once per test session)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from mmopd.config import Config, load_config
from modalities.vlm import shapes
from modalities.vlm.families import Dims, build_family_model, save_family_model

TEST_DIMS = Dims(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_layers=1,
                 vision_heads=2)
TEACHER_IMAGE_TOKENS, STUDENT_IMAGE_TOKENS = 16, 4  # the teacher reads pictures at a higher resolution


@pytest.fixture(scope="session")
def vlm_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_data")
    return {"train": shapes.write_split(root, "train", 10, seed=1, held_out=False),
            "eval": shapes.write_split(root, "eval", 4, seed=2, held_out=True)}


@pytest.fixture(scope="session")
def vlm_pair(tmp_path_factory) -> Callable[[str], dict[str, Path]]:
    """family -> {"teacher": dir, "student": dir}: a 16-image-token teacher and a 4-token student."""
    root = tmp_path_factory.mktemp("vlm_models")
    built: dict[str, dict[str, Path]] = {}

    def make(family: str) -> dict[str, Path]:
        if family not in built:
            built[family] = {
                role: save_family_model(build_family_model(family, shapes.WORDS, TEST_DIMS, tokens, seed=seed),
                                        root / family / role)
                for role, tokens, seed in (("teacher", TEACHER_IMAGE_TOKENS, 0), ("student", STUDENT_IMAGE_TOKENS, 1))}
        return built[family]

    return make


@pytest.fixture
def vlm_config(vlm_pair, vlm_data, tmp_path) -> Callable[..., Config]:
    """A factory of validated configs for one family, tiny enough to run two steps in seconds."""
    torch.manual_seed(0)

    def make(family: str, **overrides) -> Config:
        pair = vlm_pair(family)
        base = {
            "modality": "vlm",
            "student.path": str(pair["student"]),
            "teacher.path": str(pair["teacher"]),
            "data.train": str(vlm_data["train"]),
            "data.eval": "",
            "rollout.max_new_tokens": 3,
            "train.steps": 2,
            "train.batch_size": 2,
            "train.eval_every": 0,
            "train.save_every": 0,
            "train.eval_batch_size": 4,
            "train.out_dir": str(tmp_path / "run"),
            "train.progress": False,
            "train.warmup": 0,
        }
        base.update(overrides)
        return load_config(None, base)

    return make
