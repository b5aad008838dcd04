"""Teacher scoring: the frozen teacher reads each prompt (encoded its own way) plus the student's
response tokens, and returns what the divergence needs at the response positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmopd.adapter import ModalityAdapter, PromptBatch, TokenSpace
from mmopd.losses import sampled_token_logprobs


def teacher_logits(adapter: ModalityAdapter, teacher: nn.Module, prompts: PromptBatch, tokens: Tensor,
                   space: TokenSpace) -> Tensor:
    """The teacher's logits over the action space at each response position. [B, T] -> [B, T, A]"""
    with torch.inference_mode():
        logits = space.restrict(adapter.response_logits(teacher, prompts, tokens))
    return logits.clone()  # an ordinary tensor, so autograd may save it for the student's backward


def teacher_token_logprobs(adapter: ModalityAdapter, teacher: nn.Module, prompts: PromptBatch, tokens: Tensor,
                           space: TokenSpace, temperature: float = 1.0) -> Tensor:
    """log p_T of each sampled token only: O(B*T) memory kept. [B, T] -> [B, T] float32"""
    with torch.inference_mode():
        logits = space.restrict(adapter.response_logits(teacher, prompts, tokens))
        logprobs = sampled_token_logprobs(logits, space.to_actions(tokens), temperature=temperature)
    return logprobs.clone()
