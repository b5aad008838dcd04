"""Evaluation of a policy on the eval split: greedy responses (or as the adapter says), scored by the adapter;
and, beside it, the student's per-token KL to an in-process teacher in both directions (`kl_to_teacher`)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmopd.data.privileged import teacher_view
from mmopd.engines.hf import rollout
from mmopd.models.adapter import ModalityAdapter, PolicySide
from mmopd.step.batch import PromptBatch, Rollout, Sampling, TokenSpace


@torch.no_grad()
def evaluate_policy(side: PolicySide, records: list[dict], max_new_tokens: int, batch_size: int,
                    device: torch.device, desc: str = "eval", progress: bool = False) -> dict[str, Any]:
    """Responses of `side.model` to every record (greedy, or as `adapter.eval_sampling()` says, from a fixed seed),
    scored by the adapter in one call, so that set-level metrics such as FID see every response. Returns the
    metrics and the responses."""
    adapter, model, processor = side.adapter, side.model, side.processor
    was_training = model.training
    model.eval()
    sampling: Sampling = adapter.eval_sampling()
    generator = torch.Generator(device).manual_seed(0)  # every model is judged on the same draws
    responses: list[Any] = []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        chunk = records[start:start + batch_size]
        prompts = adapter.encode_prompts(chunk, processor).to(device)
        out = rollout(side, prompts, max_new_tokens, sampling, generator)
        responses.extend(adapter.decode(out.tokens, out.mask, processor))
    model.train(was_training)
    return {"metrics": adapter.score(records, responses), "responses": responses}


LOGIT_BUDGET = 1 << 24  # logits held per forward of the KL evaluation: 64 MiB in float32


def _rows(prompts: PromptBatch, rows: slice) -> PromptBatch:
    """Some rows of a prompt batch (its tensors sliced on the batch dimension), keeping their left padding."""
    def take(values: dict[str, Any]) -> dict[str, Any]:
        return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    return PromptBatch(prompts.input_ids[rows], prompts.attention_mask[rows], take(prompts.model_inputs),
                       take(prompts.state))


def _frozen(model: nn.Module, teacher: nn.Module) -> Any:
    """The teacher runs in inference mode, as it does when it scores a training step: a sharded teacher's
    all-gather buffers, once made there, cannot be written outside it."""
    return torch.inference_mode() if model is teacher else contextlib.nullcontext()


def _per_token_kl(adapter: ModalityAdapter, p_model: nn.Module, q_model: nn.Module, p_prompts: PromptBatch,
                  q_prompts: PromptBatch, out: Rollout, space: TokenSpace, teacher: nn.Module) -> tuple[float, float]:
    """Σ over masked response tokens of KL(p ‖ q) over the action space, and their count. As many rows at a time
    as keep the full-vocabulary logits [rows, T, A] per model within LOGIT_BUDGET (one row at 262k tokens)."""
    B, T = out.tokens.shape
    step = max(1, LOGIT_BUDGET // (T * space.size))
    total, count = 0.0, 0.0
    for start in range(0, B, step):
        rows = slice(start, start + step)
        tokens, mask = out.tokens[rows], out.mask[rows]  # [r, T]
        log_probs = []
        for model, prompts in ((p_model, p_prompts), (q_model, q_prompts)):
            with _frozen(model, teacher):
                logits = adapter.calls.response_logits(model, _rows(prompts, rows), tokens)
                log_probs.append(space.restrict(logits).float().log_softmax(-1))  # [r, T, A]
        p, q = log_probs
        kl = (p.exp() * (p - q)).sum(-1)  # [r, T]
        total += float((kl * mask).sum())
        count += float(mask.sum())
    return total, count


@torch.no_grad()
def kl_to_teacher(student_side: PolicySide, teacher_side: PolicySide, records: list[dict], max_new_tokens: int,
                  batch_size: int, device: torch.device) -> dict[str, float]:
    """Per token, on `records`: `reverse_kl`, KL(student ‖ teacher) on the student's own samples (what on-policy
    distillation lowers), and `forward_kl`, KL(teacher ‖ student) on the teacher's samples (coverage: how well the
    student predicts what the teacher writes, which a collapsed student cannot fake). The teacher reads a record's
    teacher-only prompt where it has one, as it does in training; the student reads `prompt`. Both models sample at
    temperature 1 from fixed seeds, over the full action space (the student's: both sides share it)."""
    adapter, space, student, teacher = student_side.adapter, student_side.space, student_side.model, teacher_side.model
    models = {"student": student, "teacher": teacher}
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    generator = torch.Generator(device).manual_seed(0)
    sums = {"reverse_kl": [0.0, 0.0], "forward_kl": [0.0, 0.0]}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        s_prompts = adapter.encode_prompts(chunk, student_side.processor).to(device)
        t_prompts = adapter.encode_prompts(teacher_view(chunk), teacher_side.processor).to(device)
        for name, side, other, own, theirs in (("reverse_kl", student_side, teacher, s_prompts, t_prompts),
                                                ("forward_kl", teacher_side, student, t_prompts, s_prompts)):
            with _frozen(side.model, teacher):
                out = rollout(side, own, max_new_tokens, Sampling(temperature=1.0), generator)
            total, count = _per_token_kl(adapter, side.model, other, own, theirs, out, space, teacher)
            sums[name][0] += total
            sums[name][1] += count
    for name, model in models.items():
        model.train(was_training[name])
    return {name: total / max(count, 1.0) for name, (total, count) in sums.items()}
