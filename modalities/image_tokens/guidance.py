"""Classifier-free guidance on batched logits: the conditional rows first, then the unconditional ones."""

from __future__ import annotations

import torch
from torch import Tensor


def with_unconditional(tokens: Tensor, scale: float) -> Tensor:
    """The same tokens for both branches when guiding: [B, ...] -> [2B, ...] (unchanged when scale == 1)."""
    return tokens if scale == 1.0 else torch.cat([tokens, tokens], dim=0)


def guide(logits: Tensor, scale: float) -> Tensor:
    """uncond + s·(cond − uncond), in float32. [2B, ..., V] -> [B, ..., V] (unchanged when scale == 1).

    Logits and log-probs give the same guided distribution: they differ by a per-row constant, and
    a constant c shifts the result by c_u + s·(c_c − c_u), again a per-row constant.
    """
    if scale == 1.0:
        return logits
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + scale * (cond - uncond)
