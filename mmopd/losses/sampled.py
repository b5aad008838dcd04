r"""The sampled-token estimator over logits: log-probs of the sampled tokens and the policy-gradient loss.

Notation as in ``mmopd.losses.exact``.

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
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mmopd.losses.exact import LOGPROB_FLOOR, _check_chunk_size, _check_temperature, _rows_per_chunk, _scaled_float


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
