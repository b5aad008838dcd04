"""Evaluation of a policy on the eval split: greedy responses (or as the adapter says), scored by the adapter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmopd.adapter import ModalityAdapter
from mmopd.batch import Sampling, TokenSpace
from mmopd.engines.hf import rollout


@torch.no_grad()
def evaluate_policy(adapter: ModalityAdapter, model: nn.Module, processor: Any, records: list[dict],
                    space: TokenSpace, eos_ids: list[int], pad_id: int, max_new_tokens: int, batch_size: int,
                    device: torch.device, desc: str = "eval", progress: bool = False) -> dict[str, Any]:
    """Responses to every record (greedy, or as `adapter.eval_sampling()` says, from a fixed seed), scored by
    the adapter in one call, so that set-level metrics such as FID see every response. Returns the metrics
    and the responses."""
    was_training = model.training
    model.eval()
    sampling: Sampling = adapter.eval_sampling()
    generator = torch.Generator(device).manual_seed(0)  # every model is judged on the same draws
    responses: list[Any] = []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        chunk = records[start:start + batch_size]
        prompts = adapter.encode_prompts(chunk, processor).to(device)
        out = rollout(adapter, model, prompts, space, eos_ids, pad_id, max_new_tokens, sampling, generator)
        responses.extend(adapter.decode(out.tokens, out.mask, processor))
    model.train(was_training)
    return {"metrics": adapter.score(records, responses), "responses": responses}
