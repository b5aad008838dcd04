r"""Exact per-token divergences over logits, their top-k form, and the masked reduction.

Notation and the divergences themselves (their values, gradients and the treatment of zero probabilities)
are in ``mmopd.losses.divergences``: ``token_divergence(z_S, z_T, kind, beta, τ)`` evaluates the registered
divergence ``kind`` on every row of the logits.

Memory. Inputs of any float dtype are flattened to ``[N, V]`` and processed in
chunks of rows, each chunk in float32 (``mmopd.losses.chunks``). The forward pass keeps only the inputs
for backward (no float32 ``[N, V]`` copy); the backward pass recomputes each
chunk in float32, evaluates the closed-form gradients and writes them in
the input's dtype. Double backward is not supported. Beyond the inputs, forward and backward hold the
``[N, V]`` gradient and one chunk's float32 buffers (three ``[rows, V]`` for reverse_kl), never two chunks'.
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

import torch
from torch.autograd.function import once_differentiable

from mmopd.losses.chunks import rows_per_chunk
from mmopd.losses.divergences import check_divergence, chunk_divergence


class _ChunkedDivergence(torch.autograd.Function):
    """Chunked divergence over [N, V] inputs that saves only the inputs and recomputes in backward."""

    @staticmethod
    def forward(ctx, student, teacher, kind, beta, temperature, chunk_size):
        # student, teacher: [N, V] in their own float dtypes
        num_rows, vocab = student.shape
        rows = rows_per_chunk(num_rows, vocab, chunk_size)
        out = torch.empty(num_rows, dtype=torch.float32, device=student.device)  # [N]
        for start in range(0, num_rows, rows):
            stop = start + rows
            out[start:stop] = chunk_divergence(student[start:stop], teacher[start:stop], kind, beta, temperature)[0]
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
            _, grad_s, grad_t = chunk_divergence(
                student[start:stop], teacher[start:stop], kind, beta, temperature, need_grads
            )
            g = grad_out[start:stop, None]  # [n, 1]
            if grad_s is not None:
                grad_student[start:stop] = grad_s.mul_(g)
            if grad_t is not None:
                grad_teacher[start:stop] = grad_t.mul_(g)
            del grad_s, grad_t  # this chunk's [n, V] buffers go before the next chunk's are made
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
    math = check_divergence(kind, beta, temperature, chunk_size)
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
        math,
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
