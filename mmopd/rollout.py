"""Sampling responses from a policy with its KV cache: masks that stop at EOS, behaviour log-probs.

Sampling happens over the adapter's TokenSpace (the actions), so a policy never emits a padded
embedding row or, for image generators, a token outside its codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmopd.adapter import ModalityAdapter, PromptBatch, TokenSpace


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1.0 disables nucleus filtering


@dataclass
class Rollout:
    tokens: Tensor  # [B, T] token ids; `pad_id` after the first EOS
    mask: Tensor  # [B, T] float32: 1 up to and including the first EOS
    logprobs: Tensor  # [B, T] float32 log-prob of each token under the sampling distribution


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. [B, A] -> [B, A]"""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one action per row from float logits [B, A]; return actions [B] and their log-probs [B]."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    logprobs = logits.log_softmax(-1)
    actions = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
    return actions, logprobs.gather(-1, actions[:, None]).squeeze(-1)


@torch.no_grad()
def rollout(adapter: ModalityAdapter, model: nn.Module, prompts: PromptBatch, space: TokenSpace,
            eos_ids: list[int], pad_id: int, max_new_tokens: int, sampling: Sampling,
            generator: torch.Generator | None = None) -> Rollout:
    """Sample up to `max_new_tokens` per prompt with the KV cache; stop early once every row ended."""
    B = prompts.input_ids.shape[0]
    device = prompts.input_ids.device
    eos = torch.tensor(eos_ids, device=device)
    tokens, logprobs, masks = [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    logits, state = adapter.start(model, prompts)
    for t in range(max_new_tokens):
        actions, lp = sample(space.restrict(logits), sampling, generator)
        token = space.to_tokens(actions)  # [B]
        masks.append(alive.float())
        tokens.append(torch.where(alive, token, torch.full_like(token, pad_id)))
        logprobs.append(torch.where(alive, lp, torch.zeros_like(lp)))
        alive = alive & ~torch.isin(token, eos)
        if not alive.any() or t == max_new_tokens - 1:
            break
        logits, state = adapter.step(model, tokens[-1], state)
    return Rollout(torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logprobs, 1))
