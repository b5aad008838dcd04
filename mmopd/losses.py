r"""Per-token divergences and the sampled-token estimator for on-policy distillation.

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

Sampled-token estimator. For tokens ``x`` drawn from a behaviour policy π_b
(usually the student that generated the rollout)::

    sampled_token_logprobs:   log p(x) = z_x / τ − logsumexp(z / τ)
                              ∂ log p(x) / ∂z = (onehot(x) − p) / τ

    sampled_reverse_kl_loss:  k = log p_S(x) − log p_T(x)      (detached)
                              E_{x∼p_S}[k] = KL(S‖T)
                              A = −k                              (advantage, discount 0)
                              ρ = exp(log p_S(x) − log π_b(x))    (π_b detached; ρ = 1 on-policy)
                              loss = −ρ·A
                              ∇loss = ρ·k·∇log p_S(x)
                              E_{x∼π_b}[ρ·k·∇log p_S(x)] = E_{x∼p_S}[k·∇log p_S(x)]
                                                         = ∇KL(S‖T)

The last step uses E_{p_S}[∇log p_S] = Σ ∇p_S = 0. Both log-probabilities in
k are clamped at ``LOGPROB_FLOOR`` as above.

Fused divergences from hidden states. The trainer never needs the ``[N, V]``
logits as tensors: ``fused_token_divergence(h_S, W_S, h_T, W_T, ...)`` computes
``z = h·Wᵀ (+ b)`` for a chunk of rows of both models, the divergence of that
chunk as above, and discards the chunk. Backward recomputes each chunk and
applies the closed-form gradients through the head::

    ∂/∂h_S = (∂/∂z_S)·W_S          [n, V]·[V, H]
    ∂/∂W_S = Σ_chunks (∂/∂z_S)ᵀ·h_S  [V, n]·[n, H], accumulated in the matmul dtype
    ∂/∂b_S = Σ_rows ∂/∂z_S

so peak memory beyond the inputs is O(chunk × V), never O(N × V). Under autocast
the head matmuls run in the autocast dtype, as the model's own lm_head would, and
∂/∂W_S accumulates in that dtype before autograd casts it to W_S's. The teacher's
side takes no gradient. ``fused_divergence_loss(..., weights)`` returns Σ w·d
instead, and because the weights are known before backward it computes the
gradients in the same pass as the values: four matmuls (the floor), no
recompute. ``fused_token_logprobs(h, W, x)`` is the per-token recompute form for the
sampled-token log-probabilities (O(N) kept: one float per position), and
``fused_sampled_reverse_kl_loss`` the weighted sampled-token estimator with its
gradients computed alongside the values (d(ρ·k)/d log p_S = ρ·k is known in forward).

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

__all__ = [
    "DIVERGENCES",
    "LOGPROB_FLOOR",
    "token_divergence",
    "sampled_token_logprobs",
    "sampled_reverse_kl_loss",
    "masked_mean",
    "fused_token_divergence",
    "fused_divergence_loss",
    "fused_sampled_reverse_kl_loss",
    "fused_token_logprobs",
    "topk_token_divergence",
    "fused_topk_logits",
    "fused_gathered_logits",
]

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


def _token_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: [n, V], [n] -> log_softmax(z / τ) at the tokens [n] float32."""
    z = _scaled_float(logits, temperature)  # [n, V]
    return z.gather(1, tokens[:, None]).squeeze(1) - z.logsumexp(-1)


def _token_logprob_grad(logits: torch.Tensor, tokens: torch.Tensor, grad_out: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """One chunk: grad_out[n] · (onehot(x) − p) / τ as [n, V] float32."""
    g = grad_out[:, None]  # [n, 1]
    grad = torch.softmax(_scaled_float(logits, temperature), dim=-1)  # [n, V]
    grad.mul_(-g).scatter_add_(1, tokens[:, None], g)
    return grad.div_(temperature)


class _ChunkedSampledLogprobs(torch.autograd.Function):
    """Chunked log-softmax gathered at given tokens; saves only logits and tokens."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):
        # logits: [N, V], tokens: [N] long
        num_rows, vocab = logits.shape
        rows = _rows_per_chunk(num_rows, vocab, chunk_size)
        out = torch.empty(num_rows, dtype=torch.float32, device=logits.device)  # [N]
        for start in range(0, num_rows, rows):
            stop = start + rows
            out[start:stop] = _token_logprob(logits[start:stop], tokens[start:stop], temperature)
        ctx.save_for_backward(logits, tokens)
        ctx.config = (temperature, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # grad_out: [N] float32
        logits, tokens = ctx.saved_tensors
        temperature, rows = ctx.config
        grad_logits = torch.empty_like(logits)  # [N, V], input dtype
        for start in range(0, logits.shape[0], rows):
            stop = start + rows
            grad_logits[start:stop] = _token_logprob_grad(
                logits[start:stop], tokens[start:stop], grad_out[start:stop], temperature
            )
        return grad_logits, None, None, None


def sampled_token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log_softmax(logits / temperature) at the given tokens: [..., V], [...] -> [...] float32."""
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if logits.dim() == 0 or tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens must have the shape of logits without its last (vocabulary) dimension, got "
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    vocab = logits.shape[-1]
    out = _ChunkedSampledLogprobs.apply(
        logits.reshape(-1, vocab),  # [N, V]
        tokens.reshape(-1).long(),  # [N]
        float(temperature),
        chunk_size,
    )  # [N]
    return out.view(tokens.shape)  # [...]


def sampled_reverse_kl_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy-gradient loss and reverse-KL estimate per sampled token: [...] -> ([...], [...]) float32."""
    tensors = {"student_logprobs": student_logprobs, "teacher_logprobs": teacher_logprobs}
    if behaviour_logprobs is not None:
        tensors["behaviour_logprobs"] = behaviour_logprobs
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-probability tensors must share one shape, got {shapes}")
    student = student_logprobs.float()  # [...]
    behaviour = student if behaviour_logprobs is None else behaviour_logprobs.float()  # [...]
    kl_estimate = (
        student.detach().clamp(min=LOGPROB_FLOOR) - teacher_logprobs.detach().float().clamp(min=LOGPROB_FLOOR)
    )  # [...]
    advantage = -kl_estimate
    ratio = torch.exp(student - behaviour.detach())  # [...]
    loss = -ratio * advantage
    return loss, kl_estimate


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ mask·values / max(Σ mask, 1); masked-out entries never leak inf/NaN into the result."""
    if values.shape != mask.shape:
        raise ValueError(
            f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    weights = mask.to(values.dtype)
    total = torch.where(mask != 0, values * weights, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / weights.sum().clamp(min=1)


# --- fused: from last hidden states and the LM head -------------------------------------------------------


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of a head's matmuls: autocast's where it is on (as the model's lm_head would run), else the head's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _cast_head(weight: torch.Tensor, bias: torch.Tensor | None,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head in its matmul dtype, cast once per call (no copy when it already is)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk of logits: [n, H] @ [V, H]ᵀ (+ [V]) -> [n, V] in the head's dtype."""
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)


def _head_backward(grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   grads: list[torch.Tensor | None], rows: slice) -> None:
    """Push one chunk's d/dlogits [n, V] through the head into grads = [hidden [N, H], weight [V, H], bias [V]]."""
    grad_hidden, grad_weight, grad_bias = grads
    g = grad_logits.to(weight.dtype)  # [n, V]
    if grad_hidden is not None:
        grad_hidden[rows] = g @ weight  # [n, H]
    if grad_weight is not None:
        grad_weight.addmm_(g.t(), hidden[rows].to(weight.dtype))  # [V, H]
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0).to(grad_bias.dtype)  # [V]


def _head_grads(ctx, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Empty gradient buffers for the student's hidden, weight and bias, where autograd asks for them. The weight's
    accumulates in the matmul dtype, ctx.dtype (autograd casts it to the weight's dtype)."""
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    return [
        torch.empty_like(hidden) if need_hidden else None,
        torch.zeros(weight.shape, dtype=ctx.dtype, device=weight.device) if need_weight else None,
        torch.zeros_like(bias) if need_bias and bias is not None else None,
    ]


def _divergence_chunk(s_hidden: torch.Tensor, student: tuple, t_hidden: torch.Tensor, teacher: tuple, rows: slice,
                      settings: tuple, scale: torch.Tensor | None = None, grads: list | None = None) -> torch.Tensor:
    """One chunk of a fused divergence: its values [n]; where grads asks, push scale[n]·∂/∂z_S through the
    student's head. The chunk's logits live only inside this call."""
    need = grads is not None and any(g is not None for g in grads)
    values, grad_z, _ = _divergence(_head_logits(s_hidden[rows], *student), _head_logits(t_hidden[rows], *teacher),
                                    *settings, (need, False))  # [n], [n, V] float32
    if need:
        _head_backward(grad_z.mul_(scale[rows, None]), s_hidden, student[0], grads, rows)
    return values


class _FusedDivergence(torch.autograd.Function):
    """Chunked divergence from hidden states and heads; saves only the inputs, recomputes logits in backward."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, kind, beta, temperature, rows):
        # s_hidden, t_hidden: [N, H_S], [N, H_T]; s_weight, t_weight: [V, H_S], [V, H_T]; biases [V] or None
        num_rows = s_hidden.shape[0]
        ctx.dtype, ctx.t_dtype = _matmul_dtype(s_weight), _matmul_dtype(t_weight)
        student, teacher = _cast_head(s_weight, s_bias, ctx.dtype), _cast_head(t_weight, t_bias, ctx.t_dtype)
        out = torch.empty(num_rows, dtype=torch.float32, device=s_hidden.device)  # [N]
        for start in range(0, num_rows, rows):
            chunk = slice(start, start + rows)
            out[chunk] = _divergence_chunk(s_hidden, student, t_hidden, teacher, chunk, (kind, beta, temperature))
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        ctx.config = (kind, beta, temperature, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # grad_out: [N] float32
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = ctx.saved_tensors
        kind, beta, temperature, rows = ctx.config
        student, teacher = _cast_head(s_weight, s_bias, ctx.dtype), _cast_head(t_weight, t_bias, ctx.t_dtype)
        grads = _head_grads(ctx, s_hidden, s_weight, s_bias)
        for start in range(0, s_hidden.shape[0], rows):
            _divergence_chunk(s_hidden, student, t_hidden, teacher, slice(start, start + rows),
                              (kind, beta, temperature), grad_out, grads)
        return (*grads, None, None, None, None, None, None, None)


def _precomputed_grads(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients a loss-form Function computed in forward, scaled by the incoming scalar, handed over once."""
    grads, ctx.grads = ctx.grads, None
    return [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]


class _FusedDivergenceLoss(torch.autograd.Function):
    """Σ_i w_i·d_i from hidden states and heads, with the gradients computed in the same pass as the values.

    The weights are known before backward, so each chunk's logits are built once: forward does the four
    matmuls of the floor (student, teacher, ∂/∂h, ∂/∂W) and keeps only [N, H], [V, H], [V] gradients for
    backward, which scales them by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, weights, kind, beta, temperature, rows):
        # s_hidden, t_hidden: [N, H_S], [N, H_T]; s_weight, t_weight: [V, H]; weights: [N] float32 (no grad)
        num_rows = s_hidden.shape[0]
        values = torch.empty(num_rows, dtype=torch.float32, device=s_hidden.device)  # [N]
        ctx.dtype = _matmul_dtype(s_weight)
        student = _cast_head(s_weight, s_bias, ctx.dtype)
        teacher = _cast_head(t_weight, t_bias, _matmul_dtype(t_weight))
        grads = _head_grads(ctx, s_hidden, s_weight, s_bias)
        for start in range(0, num_rows, rows):
            chunk = slice(start, start + rows)
            values[chunk] = _divergence_chunk(s_hidden, student, t_hidden, teacher, chunk, (kind, beta, temperature),
                                              weights, grads)
        ctx.grads = grads
        ctx.mark_non_differentiable(values)
        return (values * weights).sum(), values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_values):
        # grad_loss: [] float32; the per-token values are outputs without gradient
        return (*_precomputed_grads(ctx, grad_loss), None, None, None, None, None, None, None, None)


class _FusedSampledLoss(torch.autograd.Function):
    """Σ_i w_i·ρ_i·k_i (sampled_reverse_kl_loss, weighted) from hidden states, gradients computed with the values.

    d(ρ_i·k_i)/d log p_S(x_i) = ρ_i·k_i (k detached), known in forward, so no logits are rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, teacher_lp, behaviour_lp, weights, temperature, rows):
        # hidden: [N, H], weight: [V, H], tokens, teacher_lp, behaviour_lp (or None), weights: [N]
        ctx.dtype = _matmul_dtype(weight)
        head = _cast_head(weight, bias, ctx.dtype)
        grads = _head_grads(ctx, hidden, weight, bias)
        per_token = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N] ρ·k
        kl_estimate = torch.empty_like(per_token)  # [N] k
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            z = _head_logits(hidden[chunk], *head)  # [n, V]
            logprob = _token_logprob(z, tokens[chunk], temperature)  # [n]
            k = logprob.clamp(min=LOGPROB_FLOOR) - teacher_lp[chunk].clamp(min=LOGPROB_FLOOR)
            ratio = torch.ones_like(k) if behaviour_lp is None else torch.exp(logprob - behaviour_lp[chunk])
            per_token[chunk], kl_estimate[chunk] = ratio * k, k
            if any(g is not None for g in grads):  # [n, V] d/dz of Σ w·ρ·k, straight into the head's grads
                _head_backward(_token_logprob_grad(z, tokens[chunk], weights[chunk] * ratio * k, temperature),
                               hidden, head[0], grads, chunk)
            del z  # before the next chunk's logits
        ctx.grads = grads
        ctx.mark_non_differentiable(kl_estimate)
        return (per_token * weights).sum(), kl_estimate

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_kl):
        # grad_loss: [] float32; the KL estimate is an output without gradient
        return (*_precomputed_grads(ctx, grad_loss), None, None, None, None, None, None)


def fused_sampled_reverse_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    weights: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ weights·sampled_reverse_kl_loss(log p_S(x), ...) from hidden states, and the reverse-KL estimate k.

    [..., H], [V, H], [...] -> ([] float32, [...] float32 without grad). Equal in value and gradient to
    sampled_reverse_kl_loss on sampled_token_logprobs(h·Wᵀ + b, x), without recomputing logits in backward.
    """
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    _check_head("hidden", hidden, weight, bias)
    shapes = {"tokens": tokens.shape, "teacher_logprobs": teacher_logprobs.shape, "weights": weights.shape}
    if behaviour_logprobs is not None:
        shapes["behaviour_logprobs"] = behaviour_logprobs.shape
    if any(shape != hidden.shape[:-1] for shape in shapes.values()):
        raise ValueError(f"tokens, log-probs and weights must be [...] = {tuple(hidden.shape[:-1])}, got "
                         f"{ {name: tuple(shape) for name, shape in shapes.items()} }")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    behaviour = None if behaviour_logprobs is None else behaviour_logprobs.detach().reshape(-1).float()
    loss, kl_estimate = _FusedSampledLoss.apply(
        flat, weight, bias, tokens.reshape(-1).long(), teacher_logprobs.detach().reshape(-1).float(), behaviour,
        weights.detach().reshape(-1).float(), float(temperature),
        _rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size),
    )
    return loss, kl_estimate.view(tokens.shape)


class _FusedTokenLogprobs(torch.autograd.Function):
    """Chunked log-softmax of h·Wᵀ (+ b) at given tokens; saves only the inputs, recomputes in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, rows):
        # hidden: [N, H], weight: [V, H], bias: [V] or None, tokens: [N] long
        num_rows = hidden.shape[0]
        ctx.dtype = _matmul_dtype(weight)
        head = _cast_head(weight, bias, ctx.dtype)
        out = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)  # [N]
        for start in range(0, num_rows, rows):
            chunk = slice(start, start + rows)
            out[chunk] = _token_logprob(_head_logits(hidden[chunk], *head), tokens[chunk], temperature)
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.config = (temperature, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # grad_out: [N] float32
        hidden, weight, bias, tokens = ctx.saved_tensors
        temperature, rows = ctx.config
        head = _cast_head(weight, bias, ctx.dtype)
        grads = _head_grads(ctx, hidden, weight, bias)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            grad_z = _token_logprob_grad(_head_logits(hidden[chunk], *head), tokens[chunk], grad_out[chunk],
                                         temperature)  # [n, V] float32
            _head_backward(grad_z, hidden, head[0], grads, chunk)
            del grad_z  # before the next chunk's logits
        return (*grads, None, None, None)


class _FusedGatheredLogits(torch.autograd.Function):
    """(h·Wᵀ + b) at K given ids per row, one chunk of rows at a time; logits are linear, so backward needs no
    recompute: it scatters the [n, K] gradient into an [n, V] chunk and pushes it through the head."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, rows):
        # hidden: [N, H], weight: [V, H], bias: [V] or None, ids: [N, K] long
        ctx.dtype = _matmul_dtype(weight)
        head = _cast_head(weight, bias, ctx.dtype)
        out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)  # [N, K]
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            out[chunk] = _head_logits(hidden[chunk], *head).float().gather(1, ids[chunk])
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # grad_out: [N, K] float32
        hidden, weight, bias, ids = ctx.saved_tensors
        head_weight = weight.to(ctx.dtype)
        grads = _head_grads(ctx, hidden, weight, bias)
        for start in range(0, hidden.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            grad_z = torch.zeros(ids[chunk].shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
            _head_backward(grad_z.scatter_add_(1, ids[chunk], grad_out[chunk]), hidden, head_weight, grads, chunk)
        return (*grads, None, None)


def fused_gathered_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(h·Wᵀ + b).gather(-1, ids) without materialising [N, V]: [..., H], [V, H], [..., K] -> [..., K] float32."""
    _check_chunk_size(chunk_size)
    _check_head("hidden", hidden, weight, bias)
    if ids.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ids must be [..., K] over hidden's positions, got hidden {tuple(hidden.shape)} and ids "
                         f"{tuple(ids.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    out = _FusedGatheredLogits.apply(flat, weight, bias, ids.reshape(flat.shape[0], -1).long(),
                                     _rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size))  # [N, K]
    return out.view(ids.shape)


def _check_head(role: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{role}: hidden [..., H] and weight [V, H] must share H, got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{role}: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"{role}: hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")


def _check_fused(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias) -> None:
    _check_head("student", s_hidden, s_weight, s_bias)
    _check_head("teacher", t_hidden, t_weight, t_bias)
    if s_hidden.shape[:-1] != t_hidden.shape[:-1] or s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError(
            f"student and teacher must score the same positions over the same vocabulary, got hidden "
            f"{tuple(s_hidden.shape)} / {tuple(t_hidden.shape)} and weight "
            f"{tuple(s_weight.shape)} / {tuple(t_weight.shape)}"
        )
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (t_hidden, t_weight, t_bias)):
        raise ValueError("the teacher side of a fused divergence takes no gradient; pass detached tensors")


def _fused_args(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, kind, beta, temperature, chunk_size):
    """Check the inputs of a fused divergence; return its heads flattened to [N, H] rows and its settings."""
    _check_fused(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
    _check_divergence(kind, beta, temperature, chunk_size)
    s_flat = s_hidden.reshape(-1, s_hidden.shape[-1])  # [N, H_S]
    t_flat = t_hidden.reshape(-1, t_hidden.shape[-1])  # [N, H_T]
    rows = _rows_per_chunk(s_flat.shape[0], s_weight.shape[0], chunk_size)
    return (s_flat, s_weight, s_bias, t_flat, t_weight, t_bias), (kind, float(beta), float(temperature), rows)


def fused_token_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """token_divergence(h_S·W_Sᵀ + b_S, h_T·W_Tᵀ + b_T) without materialising either [N, V] logits.

    [..., H_S], [V, H_S], [..., H_T], [V, H_T] -> [...] float32. Differentiable with respect to the
    student's hidden, weight and bias; the teacher's tensors must not require grad.
    """
    heads, settings = _fused_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, kind, beta, temperature, chunk_size)
    return _FusedDivergence.apply(*heads, *settings).view(student_hidden.shape[:-1])  # [N] -> [...]


def fused_divergence_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    weights: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ weights·fused_token_divergence(...) and the per-token values: ([] float32, [...] float32, no grad).

    The trainer's form (weights = mask / Σ mask gives masked_mean): gradients are computed with the values,
    so no logits are recomputed in backward. Gradients flow to the student's hidden, weight and bias only.
    """
    heads, settings = _fused_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, kind, beta, temperature, chunk_size)
    if weights.shape != student_hidden.shape[:-1]:
        raise ValueError(f"weights must be [...] = {tuple(student_hidden.shape[:-1])}, got {tuple(weights.shape)}")
    flat_weights = weights.detach().reshape(-1).float()  # [N]
    loss, values = _FusedDivergenceLoss.apply(*heads, flat_weights, *settings)
    return loss, values.view(weights.shape)


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """sampled_token_logprobs(h·Wᵀ + b, tokens) without materialising [N, V]: [..., H], [V, H], [...] -> [...]."""
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    _check_head("hidden", hidden, weight, bias)
    if tokens.shape != hidden.shape[:-1]:
        raise ValueError(f"tokens must have the shape of hidden without its last dimension, got hidden "
                         f"{tuple(hidden.shape)} and tokens {tuple(tokens.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    out = _FusedTokenLogprobs.apply(
        flat, weight, bias, tokens.reshape(-1).long(), float(temperature),
        _rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size),
    )  # [N]
    return out.view(tokens.shape)  # [...]


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


@torch.no_grad()
def fused_topk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of h·Wᵀ + b one chunk of rows at a time: [..., H], [V, H] -> ([..., K] float32, [..., K] long)."""
    _check_head("hidden", hidden, weight, bias)
    _check_chunk_size(chunk_size)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    k = min(k, weight.shape[0])
    values = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)  # [N, K]
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)  # [N, K]
    rows = _rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size)
    for start in range(0, flat.shape[0], rows):
        chunk = slice(start, start + rows)
        top = _head_logits(flat[chunk], weight, bias).float().topk(k, dim=-1)
        values[chunk], ids[chunk] = top.values, top.indices
    return values.view(*hidden.shape[:-1], k), ids.view(*hidden.shape[:-1], k)
