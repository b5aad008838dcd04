"""The five training objectives as one step function: where responses come from, and the loss on them.

| kind          | responses                                  | loss                                   |
|---------------|--------------------------------------------|----------------------------------------|
| on_policy     | student samples                            | divergence(S, T) per token (or sampled) |
| gkd           | student samples with prob. λ, else answers | divergence(S, T), usually jsd β         |
| supervised_kd | dataset answers                            | divergence(S, T) (teacher soft labels)  |
| seq_kd        | teacher samples                            | NLL of the teacher's tokens             |
| sft           | dataset answers                            | NLL of the answers                      |

`objective.sft_weight > 0` adds that weight times the answers' NLL to any of them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from mmopd.adapter import ModalityAdapter, PromptBatch, TokenSpace
from mmopd.config import Config
from mmopd.losses import masked_mean, sampled_reverse_kl_loss, sampled_token_logprobs, token_divergence
from mmopd.rollout import Rollout, Sampling, rollout
from mmopd.teacher import teacher_logits, teacher_token_logprobs


def needs_teacher(config: Config) -> bool:
    return config.objective.kind != "sft"


def needs_answers(config: Config) -> bool:
    kind = config.objective.kind
    return kind in ("sft", "supervised_kd") or (kind == "gkd" and config.objective.lmbda < 1) \
        or config.objective.sft_weight > 0


@dataclass
class Models:
    """What one step touches: the adapter, both models, their processors and the shared action space."""

    adapter: ModalityAdapter
    student: nn.Module  # as trained (possibly wrapped for DDP)
    policy: nn.Module  # the same student, unwrapped, for sampling
    student_processor: Any
    teacher: nn.Module | None
    teacher_processor: Any
    space: TokenSpace
    eos_ids: list[int]
    pad_id: int
    device: torch.device


@dataclass
class Timer:
    """Wall-clock seconds per phase (rollout, teacher, student), summed over a step."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def answers_rollout(answers: list[list[int]], pad_id: int, device: torch.device) -> Rollout:
    """Dataset answers as a right-padded response batch."""
    T = max(len(a) for a in answers)
    tokens = torch.full((len(answers), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(answers), T)
    for i, ids in enumerate(answers):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1.0
    return Rollout(tokens.to(device), mask.to(device), torch.zeros(len(answers), T, device=device))


def sampling_of(config: Config) -> Sampling:
    r = config.rollout
    return Sampling(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)


def generate(m: Models, model: nn.Module, prompts: PromptBatch, config: Config,
             generator: torch.Generator | None) -> Rollout:
    """Sample responses from `model` (in eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return rollout(m.adapter, model, prompts, m.space, m.eos_ids, m.pad_id, config.rollout.max_new_tokens,
                       sampling_of(config), generator)
    finally:
        model.train(was_training)


def objective_step(m: Models, records: list[dict], config: Config, generator: torch.Generator,
                   timer: Timer, backward: Callable[[Tensor], None]) -> dict[str, float]:
    """One micro-batch: build responses, score them, backpropagate the loss; return its metrics."""
    obj = config.objective
    kind = obj.kind
    if kind in ("on_policy", "gkd", "seq_kd"):
        records = [r for r in records for _ in range(config.rollout.samples_per_prompt)]
    s_prompts = m.adapter.encode_prompts(records, m.student_processor).to(m.device)
    t_prompts = m.adapter.encode_prompts(records, m.teacher_processor).to(m.device) if needs_teacher(config) else None

    on_policy = kind == "on_policy" or (
        kind == "gkd" and torch.rand((), generator=generator, device=generator.device).item() < obj.lmbda)
    with timer.phase("rollout"):
        if on_policy:
            responses = generate(m, m.policy, s_prompts, config, generator)
        elif kind == "seq_kd":
            responses = generate(m, m.teacher, t_prompts, config, generator)
        else:
            responses = answers_rollout(m.adapter.encode_answers(records, m.student_processor), m.pad_id, m.device)
    actions = m.space.to_actions(responses.tokens)  # [B, T]
    metrics: dict[str, float] = {"on_policy": float(on_policy), "response_tokens": responses.mask.sum().item(),
                                 "response_len": responses.mask.sum(1).mean().item()}

    with timer.phase("teacher"):
        if kind == "seq_kd" or kind == "sft":
            t_scores = None
        elif obj.estimator == "sampled" and kind == "on_policy":
            t_scores = teacher_token_logprobs(m.adapter, m.teacher, t_prompts, responses.tokens, m.space,
                                              obj.temperature)
        else:
            t_scores = teacher_logits(m.adapter, m.teacher, t_prompts, responses.tokens, m.space)

    with timer.phase("student"):
        s_logits = m.space.restrict(m.adapter.response_logits(m.student, s_prompts, responses.tokens))  # [B, T, A]
        if t_scores is None:
            loss = masked_mean(-sampled_token_logprobs(s_logits, actions), responses.mask)
            metrics["nll"] = loss.item()
        elif t_scores.dim() == 2:
            s_lp = sampled_token_logprobs(s_logits, actions, temperature=obj.temperature)
            per_token, kl_estimate = sampled_reverse_kl_loss(s_lp, t_scores, responses.logprobs)
            loss = masked_mean(per_token, responses.mask)
            metrics["divergence"] = masked_mean(kl_estimate, responses.mask).item()
        else:
            div = token_divergence(s_logits, t_scores, kind=obj.divergence, beta=obj.beta,
                                   temperature=obj.temperature)  # [B, T]
            loss = masked_mean(div, responses.mask)
            metrics["divergence"] = loss.item()
        if obj.sft_weight > 0:
            answers = answers_rollout(m.adapter.encode_answers(records, m.student_processor), m.pad_id, m.device)
            a_logits = m.space.restrict(m.adapter.response_logits(m.student, s_prompts, answers.tokens))
            nll = masked_mean(-sampled_token_logprobs(a_logits, m.space.to_actions(answers.tokens)), answers.mask)
            loss = loss + obj.sft_weight * nll
            metrics["sft_nll"] = nll.item()
        backward(loss)
    metrics["loss"] = loss.item()
    return metrics
