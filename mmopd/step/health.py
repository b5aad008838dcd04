"""The health of the student's samples, so that a collapse is seen, not hidden.

A student trained on reverse KL can lower its loss by collapsing onto what the teacher also finds likely (one
repeated token, a loop of one phrase), and the loss curve then looks excellent. Four numbers per step, from the
rollout alone (so any engine's rollout gives them):

- `health/token_entropy`: the entropy, in nats, of the sampled response tokens pooled over the batch (their
  empirical distribution). Varied text has several nats; one repeated token has 0.
- `health/repeat_share`: the share of response tokens that complete an n-gram (n = REPEAT_N = 3) that already
  occurred earlier in the same response. Single words and word pairs recur in healthy text ("of the"); a
  repeated trigram inside one short response is rare, while any loop (one token or a phrase) makes nearly every
  token a repeat.
- `health/length_ratio`: the mean response length over `rollout.max_new_tokens`; a student that stops ending
  its responses runs into the limit (1.0).
- `health/surprisal`: the mean −log p of the sampled tokens under the sampling distribution (the rollout's
  behaviour log-probs): an estimate of the policy's per-token entropy at `rollout.temperature` that costs
  nothing (0 for greedy rollouts). Logged, not thresholded.

`HealthMonitor` warns once per kind when a number crosses its threshold (`train.health_*`), in one line that
says what was seen and what to try, and keeps the warnings for summary.json and the end table. Its `state()`
travels in the checkpoint, so a resumed run carries the earlier segments' warnings and warns no kind twice.

An absolute entropy floor misses a student that collapses onto a few dozen tokens (digit strings that ignore the
prompt: 2.3 nats, few exact repeats, where the teacher's samples have 5.1). Where the teacher is in this process,
the run measures once, at the start, the same number on the teacher's own samples (`teacher_entropy`: one
micro-batch of train prompts, as many responses as a student step, at the rollout's sampling, so that the pooled
empirical entropies compare) and warns when the student's falls below `train.health_min_entropy_ratio` of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("mmopd")

REPEAT_N = 3
ENTROPY, REPEAT, LENGTH = "health/token_entropy", "health/repeat_share", "health/length_ratio"
SURPRISAL = "health/surprisal"
TRY = ("lower train.lr, heal the student first with objective.kind=seq_kd or supervised_kd, or mix in the "
       "teacher's samples with objective.kind=gkd and objective.lmbda<1")
TRY_SFT = ("pair the reverse KL with SFT on the answers (objective.sft_weight=1, best on answers the teacher wrote), "
           "lower train.lr, or heal the student with objective.kind=supervised_kd first")


def token_entropy(tokens: Tensor, mask: Tensor) -> float:
    """Entropy (nats) of the empirical distribution of the masked tokens. [B, T], [B, T] -> float"""
    kept = tokens[mask.bool()]  # [N]
    if kept.numel() == 0:
        return 0.0
    counts = torch.unique(kept, return_counts=True)[1].double()  # [distinct tokens]
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def repeat_share(tokens: Tensor, mask: Tensor, n: int = REPEAT_N) -> float:
    """Share of masked tokens that end an n-gram seen earlier in the same row. [B, T], [B, T] -> float"""
    repeats = total = 0
    for row, keep in zip(tokens.tolist(), mask.bool().tolist()):
        ids = [t for t, k in zip(row, keep) if k]  # a response's tokens: its mask is a prefix
        total += len(ids)
        seen: set[tuple[int, ...]] = set()
        for end in range(n, len(ids) + 1):
            gram = tuple(ids[end - n:end])
            repeats += gram in seen
            seen.add(gram)
    return repeats / total if total else 0.0


def sample_health(tokens: Tensor, mask: Tensor, logprobs: Tensor, max_new_tokens: int) -> dict[str, float]:
    """The health numbers of one batch of responses. tokens [B, T], mask [B, T] (1 up to the first EOS), logprobs
    [B, T] (each sampled token's, under the sampling distribution)."""
    count = float(mask.sum())
    return {ENTROPY: token_entropy(tokens, mask), REPEAT: repeat_share(tokens, mask),
            LENGTH: float(mask.sum(1).mean()) / max_new_tokens,
            SURPRISAL: -float((logprobs * mask).sum()) / count if count else 0.0}


@dataclass
class HealthMonitor:
    """Watches each step's health numbers; warns once per kind.

    - entropy below `min_entropy`;
    - repeat share above `max_repeat`;
    - length ratio at or above `max_length`, having started below it (responses that never end from step 1
      are an untrained student, or a modality whose responses have a fixed length, not a runaway); checked
      only when responses can end (`can_end`: the run has EOS ids).
    - entropy below `min_entropy_ratio` × `teacher_entropy` (the teacher's samples' entropy, where measured).
    Thresholds of 0 (entropy, ratio) or 1 (repeat share, length) turn a check off."""

    min_entropy: float
    max_repeat: float
    max_length: float
    can_end: bool
    min_entropy_ratio: float = 0.0
    teacher_entropy: float | None = None
    teacher_basis: dict[str, Any] | None = None  # the settings it was measured at (a resume may change them)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    first_length: float | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run goes on from it (`restore`)."""
        return {"warnings": self.warnings, "first_length": self.first_length, "teacher_entropy": self.teacher_entropy,
                "teacher_basis": self.teacher_basis}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Go on from a checkpoint's `state()`: its warnings (kept, and not repeated), the first length and the
        teacher's entropy with the settings it was measured at. None (a checkpoint of an earlier mmopd) starts
        afresh."""
        if state:
            self.warnings = [dict(w) for w in state.get("warnings", [])]
            self.first_length = state.get("first_length")
            self.teacher_entropy, self.teacher_basis = state.get("teacher_entropy"), state.get("teacher_basis")

    def check(self, step: int, row: dict[str, Any]) -> list[str]:
        """Warn about the step's numbers that crossed a threshold for the first time; return the new messages."""
        if ENTROPY not in row:
            return []  # the step trained on samples that are not the student's (seq_kd, gkd's answers)
        entropy, repeat, length = row[ENTROPY], row[REPEAT], row[LENGTH]
        if self.first_length is None:
            self.first_length = length
        seen = []
        if entropy < self.min_entropy:
            seen.append(("low_entropy", entropy, self.min_entropy,
                         f"the student's sampled tokens have an entropy of {entropy:.2f} nats (below "
                         f"train.health_min_entropy={self.min_entropy:g}): its samples are collapsing onto few tokens",
                         TRY))
        if self.teacher_entropy is not None and entropy < self.min_entropy_ratio * self.teacher_entropy:
            seen.append(("low_entropy_vs_teacher", entropy, self.min_entropy_ratio * self.teacher_entropy,
                         f"the student's sampled tokens have an entropy of {entropy:.2f} nats, below "
                         f"train.health_min_entropy_ratio={self.min_entropy_ratio:g} of the teacher's "
                         f"{self.teacher_entropy:.2f}: its samples narrow onto few tokens (number soup, a phrase) "
                         "that the teacher also finds likely", TRY_SFT))
        if repeat > self.max_repeat and self.max_repeat < 1:
            seen.append(("repetition", repeat, self.max_repeat,
                         f"{100 * repeat:.0f}% of the student's response tokens repeat an earlier {REPEAT_N}-gram of "
                         f"the same response (above train.health_max_repeat={self.max_repeat:g}): it loops", TRY))
        if (self.can_end and self.max_length < 1 and length >= self.max_length
                and self.first_length < self.max_length):
            seen.append(("runaway_length", length, self.max_length,
                         f"the student's responses grew from {100 * self.first_length:.0f}% to {100 * length:.0f}% of "
                         f"rollout.max_new_tokens (train.health_max_length={self.max_length:g}): they stop ending", TRY))
        new = []
        for kind, value, threshold, what, remedy in seen:
            if any(w["kind"] == kind for w in self.warnings):
                continue
            message = f"step {step}: {what}; the loss may still look good. Try: {remedy}"
            log.warning("sample health: %s", message)
            self.warnings.append({"kind": kind, "step": step, "value": value, "threshold": threshold,
                                  "message": message})
            new.append(message)
        return new
