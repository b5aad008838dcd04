"""Teacher scoring: the frozen teacher reads each prompt (encoded its own way) plus the student's
response tokens, and returns what the divergence needs at the response positions.

| what is kept        | function                   | memory kept    | used by                          |
|---------------------|----------------------------|----------------|----------------------------------|
| full logits         | teacher_logits             | O(N·V)         | estimator=full (logits path)     |
| hidden + LM head    | teacher_hidden             | O(N·H)         | estimator=full (fused path)      |
| top-k logits + ids  | teacher_topk               | O(N·K)         | estimator=full, teacher.top_k=K  |
| sampled log-prob    | teacher_token_logprobs     | O(N)           | estimator=sampled                |

With `fused=True`, the teacher's [N, V] logits are never materialised: only one chunk of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmopd.adapter import ModalityAdapter, PromptBatch, ResponseHidden, TokenSpace
from mmopd.losses import fused_token_logprobs, fused_topk_logits, sampled_token_logprobs


@dataclass
class TopK:
    """The teacher's K largest logits per response position over the action space, and their action ids."""

    logits: Tensor  # [B, T, K] float32
    ids: Tensor  # [B, T, K] long, actions (indices into the TokenSpace)


def teacher_logits(adapter: ModalityAdapter, teacher: nn.Module, prompts: PromptBatch, tokens: Tensor,
                   space: TokenSpace) -> Tensor:
    """The teacher's logits over the action space at each response position. [B, T] -> [B, T, A]"""
    with torch.inference_mode():
        logits = space.restrict(adapter.response_logits(teacher, prompts, tokens))
    return logits.clone()  # an ordinary tensor, so autograd may save it for the student's backward


def teacher_hidden(adapter: ModalityAdapter, teacher: nn.Module, prompts: PromptBatch, tokens: Tensor,
                   space: TokenSpace) -> ResponseHidden:
    """The teacher's last hidden states at each response position and its head over the action space.
    [B, T] -> [B, T, H], [A, H], [A]"""
    with torch.inference_mode():
        out = adapter.response_hidden(teacher, prompts, tokens)
    # the clone is an ordinary tensor (autograd may save it for the student's backward), [B, T, H] only
    return ResponseHidden(out.hidden.clone(), out.weight, out.bias, out.logits_dtype).restrict(space)


def teacher_token_logprobs(adapter: ModalityAdapter, teacher: nn.Module, prompts: PromptBatch, tokens: Tensor,
                           space: TokenSpace, temperature: float = 1.0, fused: bool = False) -> Tensor:
    """log p_T of each sampled token only: O(B*T) memory kept. [B, T] -> [B, T] float32"""
    actions = space.to_actions(tokens)
    with torch.inference_mode():
        if fused:
            out = adapter.response_hidden(teacher, prompts, tokens).restrict(space)
            logprobs = fused_token_logprobs(out.hidden, out.weight, actions, temperature, bias=out.bias)
        else:
            logits = space.restrict(adapter.response_logits(teacher, prompts, tokens))
            logprobs = sampled_token_logprobs(logits, actions, temperature=temperature)
    return logprobs.clone()


def teacher_topk(adapter: ModalityAdapter, teacher: nn.Module, prompts: PromptBatch, tokens: Tensor,
                 space: TokenSpace, k: int, fused: bool = False) -> TopK:
    """The teacher's top-k logits over the action space: O(B*T*K) memory kept. [B, T] -> [B, T, K] twice"""
    with torch.inference_mode():
        if fused:
            out = adapter.response_hidden(teacher, prompts, tokens).restrict(space)
            values, ids = fused_topk_logits(out.hidden, out.weight, k, bias=out.bias)
        else:
            logits = space.restrict(adapter.response_logits(teacher, prompts, tokens))  # [B, T, A]
            values, ids = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    return TopK(values.clone(), ids.clone())

