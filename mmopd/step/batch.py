"""The values one step passes between its moves: encoded prompts, the action space, sampling settings
and rollouts. Every other core module and every adapter imports these; this module imports none of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class PromptBatch:
    """Encoded prompts for one model: left-padded ids, the extra inputs its forward takes (pixels, ...) and
    state that only the adapter reads (a CFG teacher's unconditional branch and scale, a response layout)."""

    input_ids: Tensor  # [B, P]
    attention_mask: Tensor  # [B, P]
    model_inputs: dict[str, Tensor] = field(default_factory=dict)  # passed to the model's forward as keywords
    state: dict[str, Any] = field(default_factory=dict)  # read by the adapter, never by the model

    def to(self, device: torch.device | str) -> "PromptBatch":
        def move(values: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()}
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), move(self.model_inputs),
                           move(self.state))

    def unpadded_ids(self) -> list[list[int]]:
        """Each prompt's token ids without its left padding."""
        return [row[mask.bool()].tolist() for row, mask in zip(self.input_ids, self.attention_mask)]


class TokenSpace:
    """The token ids a policy may emit. Divergences and sampling run over this restricted vocabulary
    (renormalised), so padded embedding rows or non-codebook tokens never get probability mass."""

    def __init__(self, size: int, ids: Tensor | None = None):
        self.size = size
        self.ids = ids  # [A] token id of each action, or None for the contiguous range [0, size)

    def restrict(self, logits: Tensor) -> Tensor:
        """[..., V_model] -> [..., A]"""
        if self.ids is None:
            return logits[..., : self.size]
        return logits.index_select(-1, self.ids.to(logits.device))

    def restrict_head(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The LM head's rows for the actions: [V_model, H], [V_model] -> [A, H], [A] (a view when contiguous)."""
        if self.ids is None:
            return weight[: self.size], None if bias is None else bias[: self.size]
        ids = self.ids.to(weight.device)
        return weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids)

    def token_ids(self) -> list[int]:
        """Every token id a policy may emit, as an engine's allow-list."""
        return list(range(self.size)) if self.ids is None else self.ids.tolist()

    def to_tokens(self, actions: Tensor) -> Tensor:
        return actions if self.ids is None else self.ids.to(actions.device)[actions]

    def to_actions(self, tokens: Tensor) -> Tensor:
        if self.ids is None:
            return tokens
        lookup = torch.full((int(self.ids.max()) + 1,), -1, dtype=torch.long, device=tokens.device)
        lookup[self.ids.to(tokens.device)] = torch.arange(self.size, device=tokens.device)
        return lookup[tokens.clamp(max=lookup.numel() - 1)]


@dataclass
class Sampling:
    """How a rollout draws responses."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1.0 disables nucleus filtering


@dataclass
class Rollout:
    tokens: Tensor  # [B, T] token ids; `pad_id` after the first EOS
    mask: Tensor  # [B, T] float32: 1 up to and including the first EOS
    logprobs: Tensor  # [B, T] float32 log-prob of each token under the sampling distribution
    rewards: Tensor | None = None  # [B] float32 each response's task reward (objective.reward), or None


def answers_rollout(answers: list[list[int]], pad_id: int, device: torch.device) -> Rollout:
    """Dataset answers as a right-padded response batch (behaviour log-probs 0: nothing was sampled)."""
    T = max(len(a) for a in answers)
    tokens = torch.full((len(answers), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(answers), T)
    for i, ids in enumerate(answers):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1.0
    return Rollout(tokens.to(device), mask.to(device), torch.zeros(len(answers), T, device=device))
