"""The five training objectives as one step function: where responses come from, and the loss on them.

| kind          | responses                                  | loss                                   |
|---------------|--------------------------------------------|----------------------------------------|
| on_policy     | student samples                            | divergence(S, T) per token (or sampled) |
| gkd           | student samples with prob. λ, else answers | divergence(S, T), usually jsd β         |
| supervised_kd | dataset answers                            | divergence(S, T) (teacher soft labels)  |
| seq_kd        | teacher samples                            | NLL of the teacher's tokens             |
| sft           | dataset answers                            | NLL of the answers                      |

`objective.sft_weight > 0` adds that weight times the answers' NLL to any of them.

Scores come in one of two forms: logits over the action space [B, T, A], or (with `objective.fused`, where
the adapter supports it) last hidden states plus the LM head, from which the losses build logits one chunk
of rows at a time. Both give the same losses and gradients; the fused form never holds [B, T, A] logits.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from mmopd.adapter import ModalityAdapter, PromptBatch, ResponseHidden, TokenSpace
from mmopd.config import Config, ConfigError, ObjectiveConfig
from mmopd.losses import (fused_divergence_loss, fused_gathered_logits, fused_sampled_reverse_kl_loss,
                          fused_token_logprobs, masked_mean, sampled_reverse_kl_loss, sampled_token_logprobs,
                          token_divergence, topk_token_divergence)
from mmopd.rollout import Rollout, Sampling, rollout
from mmopd.teacher import TopK, teacher_hidden, teacher_logits, teacher_token_logprobs, teacher_topk


log = logging.getLogger("mmopd")


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


def use_fused(m: Models, config: Config) -> bool:
    """Whether this step scores responses from hidden states and LM heads (objective.fused: auto|always|never)."""
    mode = config.objective.fused
    if mode == "never":
        return False
    scores_teacher = config.objective.kind not in ("seq_kd", "sft")  # seq_kd's teacher only samples
    roles = {"student": m.student, "teacher": m.teacher if scores_teacher else None}
    problems = [f"{role}: {why}" for role, model in roles.items()
                if model is not None and (why := m.adapter.fused_unsupported(model)) is not None]
    if problems and mode == "always":
        raise ConfigError(f"objective.fused=always, but {'; '.join(problems)}. Set objective.fused=auto (falls "
                          "back to logits where fusing is unsupported) or never")
    if problems:
        _log_once(f"objective.fused=auto scores from logits, not hidden states: {'; '.join(problems)}")
    return not problems


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def response_scores(m: Models, model: nn.Module, prompts: PromptBatch, tokens: Tensor,
                    fused: bool) -> Tensor | ResponseHidden:
    """What scores each response token over the action space: logits [B, T, A], or hidden [B, T, H] and head."""
    if fused:
        return m.adapter.response_hidden(model, prompts, tokens).restrict(m.space)
    return m.space.restrict(m.adapter.response_logits(model, prompts, tokens))


def token_logprobs(scores: Tensor | ResponseHidden, actions: Tensor, temperature: float = 1.0) -> Tensor:
    """log p of each action under the scores. [B, T] -> [B, T] float32"""
    if isinstance(scores, ResponseHidden):
        with scores.head_precision():
            return fused_token_logprobs(scores.hidden, scores.weight, actions, temperature, bias=scores.bias)
    return sampled_token_logprobs(scores, actions, temperature=temperature)


def sampled_loss(student: Tensor | ResponseHidden, actions: Tensor, teacher_logprobs: Tensor, responses: Rollout,
                 temperature: float) -> tuple[Tensor, Tensor]:
    """The sampled-token estimator's loss (masked mean) and its per-token reverse-KL estimate. -> [], [B, T]"""
    if isinstance(student, ResponseHidden):  # gradients computed with the values: no logits recomputed
        weights = responses.mask / responses.mask.sum().clamp(min=1)  # [B, T]
        with student.head_precision():
            return fused_sampled_reverse_kl_loss(student.hidden, student.weight, actions, teacher_logprobs, weights,
                                                 responses.logprobs, temperature, bias=student.bias)
    s_lp = token_logprobs(student, actions, temperature=temperature)
    per_token, kl_estimate = sampled_reverse_kl_loss(s_lp, teacher_logprobs, responses.logprobs)
    return masked_mean(per_token, responses.mask), kl_estimate


def divergence_loss(student: Tensor | ResponseHidden, teacher: Tensor | ResponseHidden | TopK,
                    obj: ObjectiveConfig, mask: Tensor) -> Tensor:
    """The masked mean over response tokens of the student's divergence from the teacher. [B, T] -> []"""
    args = {"kind": obj.divergence, "beta": obj.beta, "temperature": obj.temperature}
    if isinstance(teacher, ResponseHidden):  # gradients computed with the values: no logits recomputed
        weights = mask / mask.sum().clamp(min=1)  # [B, T]
        with student.head_precision():
            return fused_divergence_loss(student.hidden, student.weight, teacher.hidden, teacher.weight, weights,
                                         student_bias=student.bias, teacher_bias=teacher.bias, **args)[0]
    if isinstance(teacher, TopK) and isinstance(student, ResponseHidden):  # the student's logits at the K ids only
        with student.head_precision():
            student_topk = fused_gathered_logits(student.hidden, student.weight, teacher.ids, bias=student.bias)
        return masked_mean(token_divergence(student_topk, teacher.logits, **args), mask)
    if isinstance(teacher, TopK):
        return masked_mean(topk_token_divergence(student, teacher.logits, teacher.ids, **args), mask)
    return masked_mean(token_divergence(student, teacher, **args), mask)


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
    fused = use_fused(m, config)
    rollout_start = timer.seconds.get("rollout", 0.0)
    with timer.phase("rollout"):
        if on_policy:
            responses = generate(m, m.policy, s_prompts, config, generator)
        elif kind == "seq_kd":
            responses = generate(m, m.teacher, t_prompts, config, generator)
        else:
            responses = answers_rollout(m.adapter.encode_answers(records, m.student_processor), m.pad_id, m.device)
    actions = m.space.to_actions(responses.tokens)  # [B, T]
    metrics: dict[str, float] = {"on_policy": float(on_policy), "response_tokens": responses.mask.sum().item(),
                                 "response_len": responses.mask.sum(1).mean().item(), "fused": float(fused)}
    if on_policy or kind == "seq_kd":
        metrics["rollout_tokens_per_s"] = metrics["response_tokens"] / max(
            timer.seconds["rollout"] - rollout_start, 1e-9)

    with timer.phase("teacher"):
        if kind == "seq_kd" or kind == "sft":
            t_scores = None
        elif obj.estimator == "sampled" and kind == "on_policy":
            t_scores = teacher_token_logprobs(m.adapter, m.teacher, t_prompts, responses.tokens, m.space,
                                              obj.temperature, fused=fused)
        elif config.teacher.top_k:
            t_scores = teacher_topk(m.adapter, m.teacher, t_prompts, responses.tokens, m.space,
                                    config.teacher.top_k, fused=fused)
        elif fused:
            t_scores = teacher_hidden(m.adapter, m.teacher, t_prompts, responses.tokens, m.space)
        else:
            t_scores = teacher_logits(m.adapter, m.teacher, t_prompts, responses.tokens, m.space)

    with timer.phase("student"):
        s_scores = response_scores(m, m.student, s_prompts, responses.tokens, fused)
        if t_scores is None:
            loss = masked_mean(-token_logprobs(s_scores, actions), responses.mask)
            metrics["nll"] = loss.item()
        elif isinstance(t_scores, Tensor) and t_scores.dim() == 2:
            loss, kl_estimate = sampled_loss(s_scores, actions, t_scores, responses, obj.temperature)
            metrics["divergence"] = masked_mean(kl_estimate, responses.mask).item()
        else:
            loss = divergence_loss(s_scores, t_scores, obj, responses.mask)
            metrics["divergence"] = loss.item()
        if obj.sft_weight > 0:
            answers = answers_rollout(m.adapter.encode_answers(records, m.student_processor), m.pad_id, m.device)
            a_scores = response_scores(m, m.student, s_prompts, answers.tokens, fused)
            nll = masked_mean(-token_logprobs(a_scores, m.space.to_actions(answers.tokens)), answers.mask)
            loss = loss + obj.sft_weight * nll
            metrics["sft_nll"] = nll.item()
        backward(loss)
    metrics["loss"] = loss.item()
    return metrics
