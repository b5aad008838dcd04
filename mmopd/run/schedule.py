"""The learning-rate schedule of every training loop in mmopd: linear warmup, then cosine decay to 0."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The lr factor at each optimizer step (for `LambdaLR`): (s+1)/(warmup+1) while s < warmup, then
    ½(1 + cos(π·min(1, (s − warmup)/(total − warmup))))."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor
