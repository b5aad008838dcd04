"""Tiny image-token models saved by path, for the image_tokens tests: random (untrained) generators over a
random VQ, a briefly fitted judge, and shape-picture data."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from mmopd.config import Config, load_config
from modalities.image_tokens import emu3, janus, shapes
from modalities.image_tokens.judge import Judge
from modalities.image_tokens.llamagen import LlamaGenTokenizer, build_generator
from modalities.image_tokens.vq import VQConfig, VQModel

TINY_VQ = {"image_size": 16, "channels": 8, "downsamples": 2, "codebook_size": 16, "code_dim": 4}
GRID_TOKENS = 16  # 16 px / 4 = a 4×4 grid
JANUS_WORDS = ["a", *{w for name in shapes.CLASS_NAMES for w in name.split()}]


def tiny_tokenizer(seed: int = 0, codebook_size: int = 16, class_names: list[str] | None = None) -> LlamaGenTokenizer:
    torch.manual_seed(seed)
    vq = VQModel(VQConfig(**{**TINY_VQ, "codebook_size": codebook_size}))
    return LlamaGenTokenizer(vq, class_names or shapes.CLASS_NAMES)


def save_llamagen(path: Path, tokenizer: LlamaGenTokenizer, hidden: int, layers: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_generator(tokenizer, hidden=hidden, layers=layers, heads=2, intermediate=2 * hidden)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_llamagen_task(root: Path) -> dict[str, Path]:
    """A random teacher (wider) and student over one tiny VQ, data, and a judge fitted for a few steps."""
    tokenizer = tiny_tokenizer()
    paths = {"teacher": save_llamagen(root / "teacher", tokenizer, hidden=32, layers=2, seed=1),
             "student": save_llamagen(root / "student", tokenizer, hidden=16, layers=1, seed=2),
             "train": shapes.write_split(root / "data", "train", 12, seed=1),
             "eval": shapes.write_split(root / "data", "eval", 6, seed=2)}
    pictures, labels = shapes.make_images(24, seed=3)
    judge = Judge.build(shapes.CLASS_NAMES, shapes.IMAGE_SIZE)
    judge.fit(pictures, labels, steps=2, batch_size=8)
    judge.save(root / "judge")
    paths["judge"] = root / "judge"
    return paths


def llamagen_config(paths: dict[str, Path], out_dir: Path, **overrides) -> Config:
    base = {
        "modality": "image_tokens",
        "student.path": str(paths["student"]),
        "teacher.path": str(paths["teacher"]),
        "data.train": str(paths["train"]),
        "data.eval": str(paths["eval"]),
        "data.judge": str(paths["judge"]),
        "rollout.max_new_tokens": GRID_TOKENS,
        "train.steps": 2,
        "train.batch_size": 4,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.warmup": 0,
        "train.out_dir": str(out_dir),
        "train.progress": False,
    }
    base.update(overrides)
    return load_config(None, base)


def _shared_vq_pair(family: ModuleType, root: Path) -> dict[str, Path]:
    """A tiny random teacher of `family` (janus or emu3) and a narrower student that shares the teacher's
    VQ, each saved by path with the family's processor or tokenizer."""
    teacher, processor = family.build_tiny(JANUS_WORDS, hidden=32, layers=2, seed=0)
    student, _ = family.build_tiny(JANUS_WORDS, hidden=16, layers=1, seed=1)
    student.model.vqmodel.load_state_dict(teacher.model.vqmodel.state_dict())
    for role, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / role)
        processor.save_pretrained(root / role)
    return {"teacher": root / "teacher", "student": root / "student"}


def build_janus_pair(root: Path) -> dict[str, Path]:
    """A tiny random Janus teacher and a narrower student that shares the teacher's VQ, saved by path."""
    return _shared_vq_pair(janus, root)


def build_emu3_pair(root: Path) -> dict[str, Path]:
    """As build_janus_pair, with Emu3 models (4×4 codes)."""
    return _shared_vq_pair(emu3, root)
