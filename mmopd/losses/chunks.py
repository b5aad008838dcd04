"""How the losses walk [N, V] rows: a chunk of rows at a time, each chunk in float32, and the checks of the
settings every chunked kernel takes (temperature, chunk size).

By default a chunk holds at most 2**25 float32 elements (``2**25 // V`` rows, at least 1); ``chunk_size`` 0
takes every row in one chunk, and a positive int that many rows.
"""

from __future__ import annotations

import math

import torch

LOGPROB_FLOOR = -1e4  # a log-probability under this counts as this (see mmopd.losses.divergences)
CHUNK_ELEMENTS = 2**25


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(
            f"chunk_size must be None (automatic), 0 (one chunk) or a positive int, got {chunk_size!r}"
        )


def rows_per_chunk(num_rows: int, vocab: int, chunk_size: int | None) -> int:
    """Rows per chunk: the requested size, all rows for 0, or a bounded automatic size for None."""
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size == 0:
        return max(num_rows, 1)
    return chunk_size


def scaled_float(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk of logits in float32, divided by the temperature: [n, V] -> [n, V] (no copy when already so)."""
    z = logits.float()
    return z / temperature if temperature != 1.0 else z
