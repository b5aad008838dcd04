"""Atomic checkpoints and exact resume.

A checkpoint `checkpoints/step-N/` holds `model/` (the student via `save_pretrained`, with its
processor; LoRA adapters merged in, and saved unmerged in `lora/`), `trainer_state.pt` (optimizer, scheduler, RNG states, step) and a `COMPLETE` marker. It is
written to a hidden temp dir that is renamed into place only when whole, so a crash mid-write never
leaves a directory that looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmopd.lora import is_lora, merged_model

MARKER = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model: Any, processor: Any, state: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Write checkpoint `step` atomically; with keep_last > 0, delete all but the newest keep_last."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if is_lora(model):
        model.save_pretrained(tmp / "lora")  # the adapters, which a resumed run loads
        merged_model(model).save_pretrained(tmp / "model")
    else:
        model.save_pretrained(tmp / "model")
    if processor is not None:
        processor.save_pretrained(tmp / "model")
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / MARKER).write_text(str(step))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temp dirs are never listed)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
