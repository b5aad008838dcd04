r"""The top-k + tail divergence: a served teacher's K largest log-probs per position, the rest of its mass as one
class, against the student's mass on the same K ids and on everything else.

Notation as in ``mmopd.losses.divergences`` (temperature 1: a served teacher's log-probs are the raw model's). For one
position, S_K is the set of the teacher's K ids (those inside the student's action space; the others fall into
the tail), ``t_i = log p_T(i)`` for i in S_K as the teacher reported them (over its whole vocabulary), and::

    teacher:  t̂_i = t_i (i ∈ S_K),   t̂_tail = log(1 − Σ_{i∈S_K} p_T(i))       = log1mexp(logsumexp t_K)
    student:  ŝ_i = z_i − lse(z),      ŝ_tail = lse_{j∉S_K}(z_j) − lse(z)          = log(1 − Σ_{i∈S_K} p_S(i))

(a teacher tail under 1e-6, the float32 rounding of a top-k sum near 1, counts as 0),
so both are distributions over the same K + 1 classes, and ``d_{K+1} = divergence(ŝ, t̂)`` with the formulas of
``divergences`` (reverse_kl, forward_kl, jsd, tvd). The student's tail is its log-sum-exp over the complement of S_K,
never ``log(1 − Σ p)``, so it stays exact (and its gradient finite) when the top-K mass is near 1; the
student's K+1 "logits" are ``[z_K, lse_{j∉S_K} z_j]``, whose log-softmax is ŝ exactly.

Bias. Merging the classes outside S_K into one is a deterministic map of both distributions, so by the
data-processing inequality every f-divergence (KL either way, JSD, TVD) over the K + 1 classes is a **lower
bound** on the exact one over the vocabulary: ``d_{K+1} ≤ d``, with equality iff, outside S_K, the student's
distribution is proportional to the teacher's (in particular when either tail is empty). What is lost is how
the tail mass is shared among the tail tokens; what is kept — unlike ``topk_token_divergence``, which
renormalises both over S_K — is *how much* mass each model puts outside S_K, so a student that moves mass
off the teacher's top K is penalised.

The teacher's ids and log-probs are given; slots whose log-prob is −inf (ids outside the action space, or
positions past a response's end) take part in neither side: their teacher mass (if any) is already in the
teacher's tail, and the student's logit there is not excluded from its tail.
"""

from __future__ import annotations

import math

import torch

from mmopd.losses.exact import token_divergence

TAIL_FLOOR = math.log(1e-6)  # a teacher tail under 1e-6 is float32 rounding of its top-k sum, not mass: it is 0


def teacher_tail_logprob(teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_K p_T): [..., K] log-probs (−inf for unused slots) -> [...] (−inf when the K hold all mass)."""
    covered = torch.logsumexp(teacher_topk_logprobs.float(), dim=-1).clamp(max=0.0)  # [...]
    # log1mexp(x) = log(−expm1(x)) near 0, log1p(−exp(x)) far from it (both exact where they are used)
    tail = torch.where(covered > -0.6931, torch.log(-torch.expm1(covered)), torch.log1p(-torch.exp(covered)))
    return tail.masked_fill(tail < TAIL_FLOOR, float("-inf"))


def excluded_logsumexp(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row's logits except at its kept ids: [..., A], [..., K], [..., K] bool -> [...] float32."""
    excluded = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    excluded = excluded.scatter_add_(-1, ids, keep.float()) > 0  # [..., A]
    return torch.logsumexp(logits.float().masked_fill(excluded, float("-inf")), dim=-1)


def tail_token_divergence(
    student_topk_logits: torch.Tensor,
    student_rest_logsumexp: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence over the teacher's K ids plus one tail class (module docstring):
    student logits at the K ids [..., K], its logsumexp over the other actions [...], teacher log-probs [..., K]
    (−inf: unused slot) -> [...] float32. A lower bound on the full-vocabulary divergence."""
    if student_topk_logits.shape != teacher_topk_logprobs.shape or \
            student_rest_logsumexp.shape != student_topk_logits.shape[:-1]:
        raise ValueError(f"student top-k logits [..., K], its rest logsumexp [...] and the teacher's top-k log-probs "
                         f"[..., K] must agree, got {tuple(student_topk_logits.shape)}, "
                         f"{tuple(student_rest_logsumexp.shape)} and {tuple(teacher_topk_logprobs.shape)}")
    if temperature != 1.0:
        raise ValueError(f"the top-k + tail divergence is over temperature-1 log-probs (a served teacher's), got "
                         f"temperature={temperature}: the teacher's tail at another temperature needs its full logits")
    keep = teacher_topk_logprobs > float("-inf")  # [..., K]
    student = torch.cat([student_topk_logits.float().masked_fill(~keep, float("-inf")),
                         student_rest_logsumexp.float()[..., None]], dim=-1)  # [..., K+1]
    teacher = torch.cat([teacher_topk_logprobs.float(), teacher_tail_logprob(teacher_topk_logprobs)[..., None]],
                        dim=-1)  # [..., K+1]
    return token_divergence(student, teacher, kind, beta, 1.0)
