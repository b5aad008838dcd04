"""Atomic checkpoints and exact resume.

A checkpoint `checkpoints/step-N/` holds `model/` (the student via `save_pretrained`, with its
processor; LoRA adapters merged in, and saved unmerged in `lora/`), `trainer_state.pt` (optimizer, scheduler, RNG
states, step) and a `COMPLETE` marker. A sharded student's optimizer state is not in `trainer_state.pt` but in
`optimizer/`, each rank's shards written by `torch.distributed.checkpoint` (`mmopd/models/sharding.py: Sharded.save`). It is
written to a hidden temp dir that is renamed into place only when whole, so a crash mid-write never
leaves a directory that looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmopd.config import ConfigError
from mmopd.data.step_order import STEP_ORDER
from mmopd.models.lora import is_lora, merged_model

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


def trainer_state(step: int, scheduler: Any, baseline: dict[str, Any], skipped_steps: int, config: dict[str, Any],
                  run_id: str, global_batch: int, health: dict[str, Any] | None = None,
                  train_set: str = "") -> dict[str, Any]:
    """What `trainer_state.pt` holds besides the optimizer's state: where the run is and how to go on exactly
    (`health`: the sample-health monitor's state, its warnings so far among it; `train_set`: the digest of the
    training records, `Session.train_set`)."""
    return {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "baseline": baseline,
            "skipped_steps": skipped_steps, "config": config, "run_id": run_id, "global_batch": global_batch,
            "step_order": STEP_ORDER, "health": health, "train_set": train_set}


def check_global_batch(saved: int | None, per_step: int, world: int, batch_size: int, grad_accum: int,
                       checkpoint: Path) -> None:
    """A resumed run keeps the records per optimizer step (which records form each step follow from it), however
    it lays them out over processes and micro-batches."""
    if saved is None or saved == per_step:
        return
    processes = f"{world} process{'es' if world > 1 else ''}"
    fit = (f"on {processes}, set train.batch_size × train.grad_accum to {saved // world}" if saved % world == 0
           else f"{saved} does not split over {processes}; resume on a number of processes that divides it")
    raise ConfigError(f"{checkpoint} was trained with a global batch of {saved} records a step, and this run's is "
                      f"{per_step} (train.batch_size {batch_size} × train.grad_accum {grad_accum} × {processes}); a "
                      f"resumed run keeps the global batch: {fit}")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (full disk, lost permissions); the previous one is intact."""


def save_checkpoint(out_dir: str | Path, step: int, model: Any, processor: Any, state: dict[str, Any],
                    keep_last: int = 0, run_id: str = "") -> Path:
    """Write checkpoint `step` atomically; with keep_last > 0, delete all but the newest keep_last of run
    `run_id` (checkpoints of other runs are never deleted)."""
    tmp = checkpoint_dir(out_dir) / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def write_model() -> None:
        if is_lora(model):
            model.save_pretrained(tmp / "lora")  # the adapters, which a resumed run loads
            merged_model(model).save_pretrained(tmp / "model")
        else:
            model.save_pretrained(tmp / "model")

    return commit_checkpoint(out_dir, step, tmp, write_model, processor, state, keep_last, run_id)


def commit_checkpoint(out_dir: str | Path, step: int, tmp: Path, write_model: Callable[[], None], processor: Any,
            state: dict[str, Any], keep_last: int, run_id: str) -> Path:
    """Write the model (`write_model()`), processor and trainer state into `tmp`, mark it complete, fsync it and
    rename it to step-N; then prune to keep_last."""
    root = checkpoint_dir(out_dir)
    final = root / f"step-{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_model()
        if processor is not None:
            processor.save_pretrained(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / MARKER).write_text(f"{step} {run_id}".strip())
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(out_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final} ({err}); {kept}. Free space or fix the "
                              "permissions of train.out_dir, then rerun the same command to resume") from err
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        ours = [path for path in complete_checkpoints(out_dir) if run_of(path) == run_id]
        for old in ours[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def run_of(path: Path) -> str:
    """The id of the run that wrote checkpoint `path` ("" for checkpoints from before run ids)."""
    parts = (path / MARKER).read_text().split()
    return parts[1] if len(parts) > 1 else ""


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
