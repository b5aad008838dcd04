"""The deterministic batch order: which records global batch `step` reads, in O(1) memory and time a record.

Each epoch visits the n records in a seeded pseudo-random order, a permutation of [0, n) computed on the fly
rather than stored (a stored order would cost 4 bytes a record, two epochs' at an epoch boundary):
- A balanced Feistel network over 2k-bit numbers, the smallest with 4^k >= n, is a bijection of [0, 4^k): each
  of `ROUNDS` rounds maps the halves (L, R) to (R, L xor F(R)), which is invertible whatever F is. F is the
  splitmix64 finaliser of R plus a round key, cut to k bits.
- Cycle-walking restricts it to [0, n): a position whose image lies at or above n is mapped again until the
  image lies below n. Following the bijection's cycle from a point in [0, n) returns to [0, n), so this is a
  bijection of [0, n); since 4^k < 4n, it takes fewer than 4 passes on average.
- The round keys come from the train seed and the epoch, so each (seed, epoch) is another order, and any step
  is reproduced from the step counter alone (exact resume).

Checkpoints record `STEP_ORDER`; a run written with another order cannot be resumed exactly.
"""

from __future__ import annotations

import numpy as np

STEP_ORDER = "feistel-splitmix64-6"  # the order's name in checkpoints: change it with the order
ROUNDS = 6
MASK64 = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 values [M] (multiplications wrap modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def round_keys(seed: int, epoch: int) -> np.ndarray:
    """The `ROUNDS` uint64 round keys of one (seed, epoch) [ROUNDS]."""
    key = _splitmix64(np.asarray([seed & MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & MASK64))
    return _splitmix64(key + np.arange(1, ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    """The Feistel bijection of [0, 4^half_bits) at x [M] (uint64)."""
    bits, mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
    left, right = x >> bits, x & mask
    for key in keys:
        left, right = right, left ^ (_splitmix64(right + key) & mask)
    return (left << bits) | right


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The records at `positions` [M] (each in [0, n)) of epoch `epoch`'s order of n records [M] (int64)."""
    x = np.asarray(positions, dtype=np.uint64)
    half_bits = (max(n - 1, 0).bit_length() + 1) // 2  # the smallest k with 4^k >= n
    keys = round_keys(seed, epoch)
    x = _feistel(x, half_bits, keys)
    outside = x >= np.uint64(n)
    while outside.any():  # cycle-walking: map again the images that fell outside [0, n)
        x[outside] = _feistel(x[outside], half_bits, keys)
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


def step_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The record indices of global batch `step` (0-based): epochs of seeded permutations, so any step
    can be reproduced without replaying the ones before it (exact resume)."""
    flat = step * batch_size + np.arange(batch_size, dtype=np.int64)  # [batch_size] places in the endless order
    epochs, offsets = np.divmod(flat, n)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # a batch spans at most a few epochs (more only when batch_size > n)
        here = epochs == epoch
        out[here] = permute(offsets[here], n, seed, int(epoch))
    return out.tolist()
