"""Reading JSONL records, with errors that name the file and line, and the deterministic batch order."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("mmopd")


class DataError(ValueError):
    """Bad input data, with the file and line to fix."""


class RecordError(ValueError):
    """One record that cannot be used; the caller adds the file and line."""


@dataclass
class Dataset:
    path: Path
    records: list[dict[str, Any]]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.records)


def load_jsonl(path: str | Path, check: Callable[[dict, Path], dict], skip_bad: bool = False,
               role: str = "data") -> Dataset:
    """Parse every line of `path` and pass it through `check(record, base_dir)`.

    A bad line raises DataError naming `path:line`, or with `skip_bad` is logged and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role}: file not found: {path}")
    records, skipped = [], 0
    with path.open("rb") as f:
        for lineno, data in enumerate(f, start=1):
            if not data.strip():
                continue
            try:
                raw = json.loads(data.decode("utf-8"))
                if not isinstance(raw, dict):
                    raise RecordError(f"a record must be a JSON object, got {type(raw).__name__}")
                record = check(raw, path.parent)
                record["_where"] = f"{path}:{lineno}"
                records.append(record)
            except (UnicodeDecodeError, json.JSONDecodeError, RecordError) as err:
                kind = "not valid UTF-8" if isinstance(err, UnicodeDecodeError) else \
                    "not valid JSON" if isinstance(err, json.JSONDecodeError) else "bad record"
                message = f"{path}:{lineno}: {kind}: {err}"
                if not skip_bad:
                    raise DataError(message + " (set data.skip_bad=true to skip bad records)") from err
                log.warning("skipping %s", message)
                skipped += 1
    if not records:
        raise DataError(f"{role}: {path} holds no usable records" + (f" ({skipped} skipped)" if skipped else ""))
    return Dataset(path, records, skipped)


def step_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The record indices of global batch `step` (0-based): epochs of seeded permutations, so any step
    can be reproduced without replaying the ones before it (exact resume)."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
    return out
