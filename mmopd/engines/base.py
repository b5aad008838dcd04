"""The two seams of a distillation step, each a small protocol with interchangeable engines.

- A `RolloutEngine` samples responses for encoded prompts, and is told after every optimizer step that the
  student changed (`sync`), so an engine outside the trainer can load the new weights before the next
  rollout.
- A `TeacherScorer` scores the responses: it reads each prompt (encoded its own way) plus the response
  tokens, and returns the `Scores` form that the objective's `TeacherNeed` asks for.

The in-process Hugging Face engines (`mmopd.engines.hf`) are the first of each; the config picks an
engine by name (`rollout.engine`, `teacher.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from mmopd.step.batch import PromptBatch, Rollout, Sampling
from mmopd.step.objective_table import DISTRIBUTION, TOKEN_LOGPROBS
from mmopd.step.scores import Scores

TOP_K = "top_k"  # a DISTRIBUTION teacher asked for its top-k only (teacher.top_k)


@dataclass(frozen=True)
class TeacherNeed:
    """What the objective asks the teacher for, at each response position."""

    what: str  # DISTRIBUTION (full: Logits or Hidden) | TOP_K (TopK) | TOKEN_LOGPROBS (TokenLogprobs)
    k: int = 0  # TOP_K: how many
    tail: bool = False  # TOP_K: also the rest of the mass as one class (TopKTail), not a renormalised TopK
    temperature: float = 1.0  # TOKEN_LOGPROBS: the log-probs are of softmax(logits / temperature)


class RolloutEngine(Protocol):
    exact: bool  # whether its log-probs are the trainer's own (in-process); else the step measures the mismatch

    def sample(self, prompts: PromptBatch, sampling: Sampling, generator: torch.Generator | None) -> Rollout:
        """Up to the engine's max_new_tokens response tokens per prompt. [B, P] -> [B, T]"""
        ...

    def sync(self, student: nn.Module) -> None:
        """Make the engine sample from `student`'s current weights (called after each optimizer step)."""
        ...

    def close(self) -> None:
        """Remove what the engine keeps outside this process (the weights it wrote for a vLLM engine), at the end of
        a run, finished or failed."""
        ...


class TeacherScorer(Protocol):
    def score(self, prompts: PromptBatch, tokens: Tensor, need: TeacherNeed) -> Scores:
        """The teacher's scores of each response token: row t scores tokens[:, t]. [B, T] -> Scores"""
        ...
