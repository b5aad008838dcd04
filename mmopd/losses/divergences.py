r"""Per-token divergences, registered by name: the math every divergence kernel (logits, fused, top-k, tail) runs
on one chunk of rows.

Notation. For one token position, ``z_S`` and ``z_T`` are the student and teacher
logits over a vocabulary of ``V`` entries and ``τ > 0`` is the temperature::

    s = log_softmax(z_S / τ)        p_S = exp(s)
    t = log_softmax(z_T / τ)        p_T = exp(t)

Sums run over the vocabulary. Every divergence returns one value per token
position: nothing is reduced and nothing is masked (the caller masks, e.g. with
``masked_mean``).

The registered divergences (``objective.divergence``)::

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

A new divergence is one function with the fixed signature ``Divergence`` under ``@register_divergence(name)``:
it takes one chunk's float32 log-probabilities ``s``, ``t`` [n, V] (its own to overwrite), β and which
gradients to return, and returns the value [n] and ∂/∂(z_S/τ), ∂/∂(z_T/τ) [n, V] where asked
(``through_softmax`` turns a derivative w.r.t. the probabilities into one w.r.t. the logits). Config
validation, every kernel and their error messages read the registry, so nothing else changes.
"""

from __future__ import annotations

from typing import Callable

import torch

from mmopd.losses.chunks import LOGPROB_FLOOR, check_chunk_size, check_temperature, scaled_float
from mmopd.registry import Registry

# s [n, V], t [n, V] float32 log-probs, β, (need ∂/∂z_S, need ∂/∂z_T)
#   -> value [n], ∂/∂z_S [n, V] or None, ∂/∂z_T [n, V] or None
Divergence = Callable[[torch.Tensor, torch.Tensor, float, tuple[bool, bool]],
                      tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]

DIVERGENCES: Registry[Divergence] = Registry("divergence kind")  # name -> its math (objective.divergence)
register_divergence = DIVERGENCES.register
unregister_divergence = DIVERGENCES.unregister
available_divergences = DIVERGENCES.names


def divergence_math(kind: str) -> Divergence:
    """The registered divergence `kind`, or a one-line error that lists the registered ones."""
    return DIVERGENCES[kind]


def check_divergence(kind: str, beta: float, temperature: float, chunk_size: int | None) -> Divergence:
    """Refuse an unregistered kind, a β outside [0, 1], a bad temperature or chunk size, in one line; return the
    kind's math, which the kernels then hand to every chunk (resolved once a call, not once a chunk)."""
    math = divergence_math(kind)
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1] (0 = forward_kl, 1 = reverse_kl), got {beta!r}")
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    return math


def chunk_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str | Divergence,
    beta: float,
    temperature: float,
    need_grads: tuple[bool, bool] = (False, False),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk in float32: logits [n, V], [n, V] -> value [n] and, where asked, d value / d logits [n, V] each;
    `kind`: a registered name, or its math as `check_divergence` returned it."""
    value, grad_s, grad_t = (divergence_math(kind) if isinstance(kind, str) else kind)(
        torch.log_softmax(scaled_float(student, temperature), dim=-1),  # s [n, V]
        torch.log_softmax(scaled_float(teacher, temperature), dim=-1),  # t [n, V]
        beta,
        need_grads,
    )
    return value, _scaled(grad_s, temperature), _scaled(grad_t, temperature)


def through_softmax(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    """Chain rule through p = softmax(z): d/dz = p ⊙ (g − Σ p·g). [n, V], [n, V] -> [n, V]"""
    return probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))


def _scaled(grad: torch.Tensor | None, temperature: float) -> torch.Tensor | None:
    if grad is None or temperature == 1.0:
        return grad
    return grad.div_(temperature)


@register_divergence("reverse_kl")
def reverse_kl(s: torch.Tensor, t: torch.Tensor, beta: float,
               need_grads: tuple[bool, bool]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """KL(S‖T), in place in the two chunks it is given (the hot path of on-policy distillation): three [n, V]
    buffers at most, s, t and the product inside the sum."""
    need_student, need_teacher = need_grads
    grad_t = t.exp().sub_(s.exp()) if need_teacher else None  # p_T − p_S
    s, t = s.clamp_(min=LOGPROB_FLOOR), t.clamp_(min=LOGPROB_FLOOR)
    log_ratio = torch.sub(s, t, out=t)  # [n, V] s − t, in t's buffer
    p_s = s.exp_()  # [n, V] in s's buffer: e^s of the floored s is e^s (e^−1e4 is 0 in float32)
    value = torch.linalg.vecdot(p_s, log_ratio)  # [n]
    grad_s = log_ratio.sub_(value[:, None]).mul_(p_s) if need_student else None
    return value, grad_s, grad_t


@register_divergence("forward_kl")
def forward_kl(s: torch.Tensor, t: torch.Tensor, beta: float,
               need_grads: tuple[bool, bool]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """KL(T‖S)."""
    need_student, need_teacher = need_grads
    p_s, p_t = s.exp(), t.exp()  # [n, V]
    s, t = s.clamp_(min=LOGPROB_FLOOR), t.clamp_(min=LOGPROB_FLOOR)
    log_ratio = t - s  # [n, V]
    value = (p_t * log_ratio).sum(-1)
    grad_s = p_s - p_t if need_student else None
    grad_t = p_t * (log_ratio - value[:, None]) if need_teacher else None
    return value, grad_s, grad_t


@register_divergence("jsd")
def jsd(s: torch.Tensor, t: torch.Tensor, beta: float,
        need_grads: tuple[bool, bool]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """β·KL(T‖M) + (1−β)·KL(S‖M); β = 0 is forward_kl and β = 1 reverse_kl."""
    if beta == 0.0:
        return forward_kl(s, t, beta, need_grads)
    if beta == 1.0:
        return reverse_kl(s, t, beta, need_grads)
    need_student, need_teacher = need_grads
    p_s, p_t = s.exp(), t.exp()  # [n, V]
    s, t = s.clamp_(min=LOGPROB_FLOOR), t.clamp_(min=LOGPROB_FLOOR)
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
    return value, grad_s, grad_t


@register_divergence("tvd")
def tvd(s: torch.Tensor, t: torch.Tensor, beta: float,
        need_grads: tuple[bool, bool]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """½ Σ |p_S − p_T|."""
    need_student, need_teacher = need_grads
    p_s, p_t = s.exp(), t.exp()  # [n, V]
    diff = p_s - p_t
    value = 0.5 * diff.abs().sum(-1)
    half_sign = 0.5 * diff.sign_()  # d value / d p_S; d value / d p_T is its negative
    grad_s = through_softmax(p_s, half_sign) if need_student else None
    grad_t = through_softmax(p_t, -half_sign) if need_teacher else None
    return value, grad_s, grad_t
