"""The in-process Hugging Face engines: sampling with mmopd's own KV-cache decode loop (`rollout`), and
teacher scoring by one forward pass over prompt + response. `model_scores` is the one forward that both
the teacher and the student go through.

Sampling happens over the adapter's TokenSpace (the actions), so a policy never emits a padded embedding
row or, for image generators, a token outside its codebook. The rollout's mask stops after the first EOS,
and its log-probs are the sampled tokens' under the sampling distribution (temperature, top-k, top-p).

| TeacherNeed     | logits path (fused=False) | hidden path (fused=True)      | memory kept |
|-----------------|---------------------------|-------------------------------|-------------|
| distribution    | Logits [B, T, A]          | Hidden [B, T, H] + LM head    | O(N·A), O(N·H) |
| top_k           | TopK from the logits      | TopK one chunk of rows at a time | O(N·K)   |
| top_k, tail     | TopKTail: top-k log-probs | TopKTail, chunked log-sum-exp | O(N·K)      |
| token_logprobs  | TokenLogprobs             | TokenLogprobs, chunked        | O(N)        |
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmopd.engines.base import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, TeacherNeed
from mmopd.losses import fused_excluded_logsumexp, fused_topk_logits
from mmopd.models.adapter import ModalityAdapter, PolicySide
from mmopd.models.sharding import any_rank
from mmopd.step.batch import PromptBatch, Rollout, Sampling, TokenSpace
from mmopd.step.scores import Hidden, Logits, Scores, TokenLogprobs, TopK, TopKTail


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
def rollout(side: PolicySide, prompts: PromptBatch, max_new_tokens: int, sampling: Sampling,
            generator: torch.Generator | None = None) -> Rollout:
    """Sample up to `max_new_tokens` per prompt from `side.model` with the KV cache; stop early once every row ended
    (for a sharded model, every row on every rank: each forward needs all of them)."""
    adapter, model, space, eos_ids, pad_id = side.adapter, side.model, side.space, side.eos_ids, side.pad_id
    B = prompts.input_ids.shape[0]
    device = prompts.input_ids.device
    eos = torch.tensor(eos_ids, device=device)
    tokens, logprobs, masks = [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    logits, state = adapter.calls.start(model, prompts)
    for t in range(max_new_tokens):
        actions, lp = sample(space.restrict(logits), sampling, generator)
        token = space.to_tokens(actions)  # [B]
        masks.append(alive.float())
        tokens.append(torch.where(alive, token, torch.full_like(token, pad_id)))
        logprobs.append(torch.where(alive, lp, torch.zeros_like(lp)))
        alive = alive & ~torch.isin(token, eos)
        if t == max_new_tokens - 1 or not any_rank(alive, model):
            break
        logits, state = adapter.calls.step(model, tokens[-1], state)
    return Rollout(torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logprobs, 1))


def model_scores(adapter: ModalityAdapter, model: nn.Module, prompts: PromptBatch, tokens: Tensor,
                 space: TokenSpace, fused: bool) -> Logits | Hidden:
    """What scores each response token over the action space: logits [B, T, A], or hidden [B, T, H] and head."""
    if fused:
        return adapter.calls.response_hidden(model, prompts, tokens).restrict(space)
    return Logits(space.restrict(adapter.calls.response_logits(model, prompts, tokens)))


class HFRollout:
    """Samples from an in-process model (the student, or seq_kd's teacher) with the KV-cache decode loop. `exact`:
    its behaviour log-probs are the trainer's own numerics."""

    exact = True

    def __init__(self, side: PolicySide, max_new_tokens: int):
        self.side, self.model, self.max_new_tokens = side, side.model, max_new_tokens

    def close(self) -> None:
        """Nothing to remove: the engine is this process."""

    def sample(self, prompts: PromptBatch, sampling: Sampling, generator: torch.Generator | None) -> Rollout:
        was_training = self.model.training
        self.model.eval()
        try:
            return rollout(self.side, prompts, self.max_new_tokens, sampling, generator)
        finally:
            self.model.train(was_training)

    def sync(self, student: nn.Module) -> None:
        """Nothing to do: this engine samples from the trained module itself."""


class HFTeacher:
    """Scores with an in-process frozen teacher; `fused` keeps hidden states instead of [B, T, A] logits."""

    def __init__(self, adapter: ModalityAdapter, model: nn.Module, space: TokenSpace, fused: bool):
        self.adapter, self.model, self.space, self.fused = adapter, model, space, fused

    def score(self, prompts: PromptBatch, tokens: Tensor, need: TeacherNeed) -> Scores:
        with torch.inference_mode():
            if need.what == DISTRIBUTION and self.fused:  # the head is restricted outside inference mode below
                out = self.adapter.calls.response_hidden(self.model, prompts, tokens)
            else:
                scores = model_scores(self.adapter, self.model, prompts, tokens, self.space, self.fused)
            if need.what == TOKEN_LOGPROBS:
                kept = TokenLogprobs(scores.logprobs(self.space.to_actions(tokens), need.temperature))
            elif need.what == TOP_K:
                kept = _top_k(scores, need.k, need.tail)
            elif need.what != DISTRIBUTION:
                raise ValueError(f"unknown teacher need {need.what!r}")
        # clones are ordinary tensors, so autograd may save them for the student's backward
        if need.what == DISTRIBUTION and self.fused:
            return Hidden(out.hidden.clone(), out.weight, out.bias, out.logits_dtype).restrict(self.space)
        if need.what == DISTRIBUTION:
            return Logits(scores.values.clone())
        if need.what == TOP_K and need.tail:
            return TopKTail(kept.values.clone(), kept.ids.clone())
        if need.what == TOP_K:
            return TopK(kept.logits.clone(), kept.ids.clone())
        return TokenLogprobs(kept.values.clone())


def _top_k(scores: Logits | Hidden, k: int, tail: bool) -> TopK | TopKTail:
    """The K largest logits over the action space and their actions, or (`tail`) their log-probs over the
    action space, the rest of the mass left to one tail class as a served teacher sends it. -> [B, T, K] twice"""
    if isinstance(scores, Hidden):
        top = TopK(*fused_topk_logits(scores.hidden, scores.weight, k, bias=scores.bias))
        if not tail:
            return top
        nothing = torch.zeros_like(top.ids, dtype=torch.bool)  # exclude no id: the log-sum-exp of every action
        lse = fused_excluded_logsumexp(scores.hidden, scores.weight, top.ids, nothing, bias=scores.bias)  # [B, T]
        return TopKTail(top.logits - lse[..., None], top.ids)
    logits = scores.values.float()  # [B, T, A]
    values, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    if tail:
        return TopKTail(values - logits.logsumexp(-1, keepdim=True), ids)
    return TopK(values, ids)
