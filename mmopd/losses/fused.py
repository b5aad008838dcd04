r"""Fused chunked kernels: divergences, sampled-token log-probs and losses from last hidden states and the
LM head, never holding the [N, V] logits.

Notation and the divergences as in ``mmopd.losses.divergences``.

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
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mmopd.losses.chunks import LOGPROB_FLOOR, check_chunk_size, check_temperature, rows_per_chunk
from mmopd.losses.divergences import check_divergence, chunk_divergence
from mmopd.losses.sampled import _token_logprob, _token_logprob_grad


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
    values, grad_z, _ = chunk_divergence(_head_logits(s_hidden[rows], *student), _head_logits(t_hidden[rows], *teacher),
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
    check_temperature(temperature)
    check_chunk_size(chunk_size)
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
        rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size),
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
    check_chunk_size(chunk_size)
    _check_head("hidden", hidden, weight, bias)
    if ids.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ids must be [..., K] over hidden's positions, got hidden {tuple(hidden.shape)} and ids "
                         f"{tuple(ids.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    out = _FusedGatheredLogits.apply(flat, weight, bias, ids.reshape(flat.shape[0], -1).long(),
                                     rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size))  # [N, K]
    return out.view(ids.shape)


class _FusedExcludedLogsumexp(torch.autograd.Function):
    """logsumexp of h·Wᵀ + b over each row's vocabulary minus its excluded ids, one chunk of rows at a time;
    backward recomputes the chunk: d lse / d z = softmax over the kept entries (0 at the excluded ones)."""

    @staticmethod
    def _chunk(hidden, head, ids, keep, chunk):
        z = _head_logits(hidden[chunk], *head).float()  # [n, V]
        excluded = torch.zeros_like(z).scatter_add_(1, ids[chunk], keep[chunk].float()) > 0
        return z.masked_fill_(excluded, float("-inf"))

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, keep, rows):
        # hidden: [N, H], weight: [V, H], bias: [V] or None, ids: [N, K] long, keep: [N, K] bool
        ctx.dtype = _matmul_dtype(weight)
        head = _cast_head(weight, bias, ctx.dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            out[chunk] = torch.logsumexp(_FusedExcludedLogsumexp._chunk(hidden, head, ids, keep, chunk), dim=-1)
        ctx.save_for_backward(hidden, weight, bias, ids, keep, out)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # grad_out: [N] float32
        hidden, weight, bias, ids, keep, out = ctx.saved_tensors
        head = _cast_head(weight, bias, ctx.dtype)
        grads = _head_grads(ctx, hidden, weight, bias)
        for start in range(0, hidden.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            z = _FusedExcludedLogsumexp._chunk(hidden, head, ids, keep, chunk)  # [n, V]
            lse = out[chunk, None]
            grad_z = torch.where(torch.isfinite(lse), (z - lse).exp_(), 0.0).mul_(grad_out[chunk, None])
            _head_backward(grad_z, hidden, head[0], grads, chunk)
            del z, grad_z
        return (*grads, None, None, None)


def fused_excluded_logsumexp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    keep: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """logsumexp of h·Wᵀ + b except at the kept ids, without materialising [N, V]:
    [..., H], [V, H], [..., K] ids, [..., K] bool -> [...] float32 (the student's tail in ``losses.tail``)."""
    check_chunk_size(chunk_size)
    _check_head("hidden", hidden, weight, bias)
    if ids.shape[:-1] != hidden.shape[:-1] or keep.shape != ids.shape:
        raise ValueError(f"ids and keep must be [..., K] over hidden's positions, got hidden {tuple(hidden.shape)}, "
                         f"ids {tuple(ids.shape)} and keep {tuple(keep.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    out = _FusedExcludedLogsumexp.apply(flat, weight, bias, ids.reshape(flat.shape[0], -1).long(),
                                        keep.reshape(flat.shape[0], -1).bool(),
                                        rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size))  # [N]
    return out.view(hidden.shape[:-1])


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
    math = check_divergence(kind, beta, temperature, chunk_size)
    s_flat = s_hidden.reshape(-1, s_hidden.shape[-1])  # [N, H_S]
    t_flat = t_hidden.reshape(-1, t_hidden.shape[-1])  # [N, H_T]
    rows = rows_per_chunk(s_flat.shape[0], s_weight.shape[0], chunk_size)
    return (s_flat, s_weight, s_bias, t_flat, t_weight, t_bias), (math, float(beta), float(temperature), rows)


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
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    _check_head("hidden", hidden, weight, bias)
    if tokens.shape != hidden.shape[:-1]:
        raise ValueError(f"tokens must have the shape of hidden without its last dimension, got hidden "
                         f"{tuple(hidden.shape)} and tokens {tuple(tokens.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    out = _FusedTokenLogprobs.apply(
        flat, weight, bias, tokens.reshape(-1).long(), float(temperature),
        rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size),
    )  # [N]
    return out.view(tokens.shape)  # [...]


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
    check_chunk_size(chunk_size)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    k = min(k, weight.shape[0])
    values = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)  # [N, K]
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)  # [N, K]
    rows = rows_per_chunk(flat.shape[0], weight.shape[0], chunk_size)
    for start in range(0, flat.shape[0], rows):
        chunk = slice(start, start + rows)
        top = _head_logits(flat[chunk], weight, bias).float().topk(k, dim=-1)
        values[chunk], ids[chunk] = top.values, top.indices
    return values.view(*hidden.shape[:-1], k), ids.view(*hidden.shape[:-1], k)
