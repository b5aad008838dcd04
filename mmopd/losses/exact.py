r"""Exact per-token divergences over logits, their top-k form, and the masked reduction.

Notation. For one token position, ``z_S`` and ``z_T`` are the student and teacher
logits over a vocabulary of ``V`` entries and ``τ > 0`` is the temperature::

    s = log_softmax(z_S / τ)        p_S = exp(s)
    t = log_softmax(z_T / τ)        p_T = exp(t)

Sums run over the vocabulary. Every function returns one value per token
position: nothing is reduced and nothing is masked (the caller masks, e.g. with
``masked_mean``).

Full-vocabulary divergences, ``token_divergence(z_S, z_T, kind, beta, τ)``::

    reverse_kl   KL(S‖T) = Σ p_S (s − t)
    forward_kl   KL(T‖S) = Σ p_T (t − s)
    jsd          β·KL(T‖M) + (1−β)·KL(S‖M),   M = β·p_T + (1−β)·p_S,
                 log M = logaddexp(t + log β, s + log(1−β))
    tvd          ½ Σ |p_S − p_T|

``jsd`` follows TRL's ``generalized_jsd_loss`` (GKD): β = 0 is *defined* as
forward_kl, KL(T‖S), and β = 1 as reverse_kl, KL(S‖T) (the mixture formula
itself vanishes at both ends). β must lie in [0, 1].

Gradients, in closed form (the backward pass evaluates these; for any kind,
∂/∂z = p ⊙ (g − Σ p·g) / τ where g is the derivative w.r.t. the probabilities p)::

    reverse_kl   ∂/∂z_S = p_S ⊙ (s − t − KL(S‖T)) / τ        ∂/∂z_T = (p_T − p_S) / τ
    forward_kl   ∂/∂z_S = (p_S − p_T) / τ                     ∂/∂z_T = p_T ⊙ (t − s − KL(T‖S)) / τ
    jsd          ∂/∂z_S = (1−β) p_S ⊙ (s − log M − KL(S‖M)) / τ
                 ∂/∂z_T = β p_T ⊙ (t − log M − KL(T‖M)) / τ
    tvd          g_S = ½ sign(p_S − p_T),  g_T = −g_S

Zero probabilities. A logit of −inf (a vocabulary entry a model forbids) gives
a log-probability of −inf. Inside the differences above, log-probabilities are
clamped below at ``LOGPROB_FLOOR`` = −1e4, i.e. a probability under e^−1e4
(which is 0 in float32 anyway) counts as e^−1e4. Consequences:

* a term whose weight p is 0 contributes exactly 0 (never 0·inf = NaN), so
  forward_kl, jsd and tvd are exact when the teacher forbids tokens;
* reverse_kl where the student has mass q on a token the teacher forbids is
  +inf mathematically; here it is finite and large, about q·(1e4 + s)
  (symmetrically for forward_kl on tokens the student forbids);
* values and gradients stay finite for large-magnitude logits (e.g. ±1e4).

Memory. Inputs of any float dtype are flattened to ``[N, V]`` and processed in
chunks of rows, each chunk in float32. The forward pass keeps only the inputs
for backward (no float32 ``[N, V]`` copy); the backward pass recomputes each
chunk in float32, evaluates the closed-form gradients above and writes them in
the input's dtype. Double backward is not supported.
By default a chunk holds at most 2**25 float32 elements (``2**25 // V`` rows,
at least 1).

Top-k teacher distributions. ``topk_token_divergence`` keeps, per position, the
teacher's K largest logits and their ids, and takes the divergence of the two
distributions renormalised over those K ids::

    S_K = top-K ids of z_T,   s̃ = log_softmax(z_S[S_K] / τ),   t̃ = log_softmax(z_T[S_K] / τ)
    d_K = divergence(s̃, t̃)

It is biased: it is exact when the teacher's mass outside S_K is 0 and the
student's too, but it ignores the student's mass outside S_K entirely (a student
that puts mass on tokens outside the teacher's top-K is not penalised for it,
only for how it shares the mass inside S_K).

Reduction over response tokens::

    masked_mean(v, m) = Σ m·v / max(Σ m, 1)
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tvd")
LOGPROB_FLOOR = -1e4
_CHUNK_ELEMENTS = 2**25


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_divergence(kind: str, beta: float, temperature: float, chunk_size: int | None) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds are {DIVERGENCES}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1] (0 = forward_kl, 1 = reverse_kl), got {beta!r}")
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(
            f"chunk_size must be None (automatic), 0 (one chunk) or a positive int, got {chunk_size!r}"
        )


def _rows_per_chunk(num_rows: int, vocab: int, chunk_size: int | None) -> int:
    """Rows per chunk: the requested size, all rows for 0, or a bounded automatic size for None."""
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size == 0:
        return max(num_rows, 1)
    return chunk_size


def _scaled_float(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.float()
    return z / temperature if temperature != 1.0 else z


def _divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
    need_grads: tuple[bool, bool] = (False, False),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk in float32: [n, V], [n, V] -> value [n] and, where asked, d value / d logits [n, V] each."""
    need_student, need_teacher = need_grads
    s = torch.log_softmax(_scaled_float(student, temperature), dim=-1)  # [n, V]
    t = torch.log_softmax(_scaled_float(teacher, temperature), dim=-1)  # [n, V]
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    p_s = s.exp()  # [n, V]
    p_t = t.exp() if kind != "reverse_kl" or need_teacher else None  # [n, V]

    if kind == "tvd":
        diff = p_s - p_t
        value = 0.5 * diff.abs().sum(-1)
        half_sign = 0.5 * diff.sign_()  # d value / d p_S; d value / d p_T is its negative
        grad_s = _through_softmax(p_s, half_sign) if need_student else None
        grad_t = _through_softmax(p_t, -half_sign) if need_teacher else None
        return value, _scaled(grad_s, temperature), _scaled(grad_t, temperature)

    s = s.clamp_(min=LOGPROB_FLOOR)
    t = t.clamp_(min=LOGPROB_FLOOR)
    if kind == "reverse_kl":  # in place: the hot path of on-policy distillation
        grad_t = p_t - p_s if need_teacher else None
        log_ratio = s.sub_(t)  # [n, V]
        value = torch.linalg.vecdot(p_s, log_ratio)
        grad_s = log_ratio.sub_(value[:, None]).mul_(p_s) if need_student else None
    elif kind == "forward_kl":
        log_ratio = t - s
        value = (p_t * log_ratio).sum(-1)
        grad_s = p_s - p_t if need_student else None
        grad_t = p_t * (log_ratio - value[:, None]) if need_teacher else None
    else:
        # log M relative to the larger of s, t, so that s − log M and t − log M are exact (0 when s = t):
        # d = t − s;  d ≤ 0: log M = s + log1p(β·expm1(d));  d > 0: log M = t + log1p((1−β)·expm1(−d)).
        d = t - s  # [n, V], finite after the floor
        below = d <= 0
        log_m_excess = torch.log1p(torch.where(below, beta, 1.0 - beta) * torch.expm1(-d.abs()))
        s_minus_log_m = torch.where(below, 0.0, -d) - log_m_excess  # [n, V]
        t_minus_log_m = torch.where(below, d, 0.0) - log_m_excess  # [n, V]
        kl_student = (p_s * s_minus_log_m).sum(-1)
        kl_teacher = (p_t * t_minus_log_m).sum(-1)
        value = beta * kl_teacher + (1.0 - beta) * kl_student
        # d value / d p_S = (1−β)(s − log M) and d value / d p_T = β(t − log M); the mixture terms cancel.
        grad_s = (1.0 - beta) * p_s * (s_minus_log_m - kl_student[:, None]) if need_student else None
        grad_t = beta * p_t * (t_minus_log_m - kl_teacher[:, None]) if need_teacher else None
    return value, _scaled(grad_s, temperature), _scaled(grad_t, temperature)


def _through_softmax(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    """Chain rule through p = softmax(z): d/dz = p ⊙ (g − Σ p·g)."""
    return probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))


def _scaled(grad: torch.Tensor | None, temperature: float) -> torch.Tensor | None:
    if grad is None or temperature == 1.0:
        return grad
    return grad.div_(temperature)


class _ChunkedDivergence(torch.autograd.Function):
    """Chunked divergence over [N, V] inputs that saves only the inputs and recomputes in backward."""

    @staticmethod
    def forward(ctx, student, teacher, kind, beta, temperature, chunk_size):
        # student, teacher: [N, V] in their own float dtypes
        num_rows, vocab = student.shape
        rows = _rows_per_chunk(num_rows, vocab, chunk_size)
        out = torch.empty(num_rows, dtype=torch.float32, device=student.device)  # [N]
        for start in range(0, num_rows, rows):
            stop = start + rows
            out[start:stop] = _divergence(student[start:stop], teacher[start:stop], kind, beta, temperature)[0]
        ctx.save_for_backward(student, teacher)
        ctx.config = (kind, beta, temperature, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # grad_out: [N] float32
        student, teacher = ctx.saved_tensors
        kind, beta, temperature, rows = ctx.config
        need_grads = tuple(ctx.needs_input_grad[:2])
        grad_student = torch.empty_like(student) if need_grads[0] else None  # [N, V], input dtype
        grad_teacher = torch.empty_like(teacher) if need_grads[1] else None  # [N, V], input dtype
        for start in range(0, student.shape[0], rows):
            stop = start + rows
            _, grad_s, grad_t = _divergence(
                student[start:stop], teacher[start:stop], kind, beta, temperature, need_grads
            )
            g = grad_out[start:stop, None]  # [n, 1]
            if grad_s is not None:
                grad_student[start:stop] = grad_s.mul_(g)
            if grad_t is not None:
                grad_teacher[start:stop] = grad_t.mul_(g)
        return grad_student, grad_teacher, None, None, None, None


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Full-vocabulary divergence per token: [..., V], [..., V] -> [...] float32 (see module docstring)."""
    _check_divergence(kind, beta, temperature, chunk_size)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension [..., V], got a 0-d tensor")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError(
            f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}"
        )
    vocab = student_logits.shape[-1]
    out = _ChunkedDivergence.apply(
        student_logits.reshape(-1, vocab),  # [N, V]
        teacher_logits.reshape(-1, vocab),  # [N, V]
        kind,
        float(beta),
        float(temperature),
        chunk_size,
    )  # [N]
    return out.view(student_logits.shape[:-1])  # [...]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ mask·values / max(Σ mask, 1); masked-out entries never leak inf/NaN into the result."""
    if values.shape != mask.shape:
        raise ValueError(
            f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    weights = mask.to(values.dtype)
    total = torch.where(mask != 0, values * weights, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / weights.sum().clamp(min=1)


def topk_token_divergence(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence over each position's K teacher ids, both renormalised there: [..., V], [..., K], [..., K] -> [...]."""
    if teacher_topk_logits.shape != teacher_topk_ids.shape or \
            teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher top-k logits and ids must be [..., K] over the student's positions, got "
                         f"{tuple(teacher_topk_logits.shape)}, {tuple(teacher_topk_ids.shape)} and student "
                         f"{tuple(student_logits.shape)}")
    student_topk = student_logits.gather(-1, teacher_topk_ids)  # [..., K]
    return token_divergence(student_topk, teacher_topk_logits, kind, beta, temperature)
