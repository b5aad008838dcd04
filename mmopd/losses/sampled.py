r"""The sampled-token estimator over logits: log-probs of the sampled tokens and the policy-gradient loss.

Notation as in ``mmopd.losses.divergences``.

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

Shaped variants (``shaped_sampled_loss``: loss = ρ·c with a detached coefficient c in place of k)::

    baseline "loo":   c = k − b,  b = mean of k at the same position over the prompt's other samples
                      (independent of x, so E[(k − b)·∇log p_S(x)] = ∇KL(S‖T): unbiased)
    baseline "batch": the same over every other row of the batch (other prompts' samples, drawn
                      independently: unbiased too), which needs no more than one sample a prompt
    clip C:           c = clamp(k, −C, C)   (biased: tokens with |k| > C count as |k| = C)
    kl "k3":          verl's low_var_kl, differentiated: loss = ρ·k3,  r = p_T(x) / p_S(x),
                      k3 = r − 1 − log r  (log r clamped to ±20, k3 to ±10 as verl does)
                      ∇k3 = (1 − r)·∇log p_S(x),  E_{p_S}[(1 − r)·∇log p_S] = −Σ p_T·∇log p_S
                                                                         = ∇KL(T‖S)
                      (the forward KL's gradient, not the reverse KL's, where no clamp binds)

Task rewards (objective.reward; ``reward_advantage``, ``policy_gradient_loss``). A response's reward R enters
every one of its tokens' advantage beside the KL term, weighted (kl weight λ_KL, reward weight λ_R)::

    A_t = −λ_KL·c_t + λ_R·Â,   Â = R − b            (b: the mean reward of the prompt's samples, or 0)
                               Â = (R − b) / (σ + ε) (std scaling as in GRPO: σ the unbiased std of the
                                                      prompt's rewards, ε = 1e-6)
    loss = −ρ·A_t  (c_t the shaped coefficient above; with k3, λ_KL·ρ·k3 − ρ·λ_R·Â)

The reward's gradient is λ_R·Â·∇log p_S(x_t) summed over the response, the REINFORCE estimate of
∇E[R]; b depends on the other samples of the prompt only through its mean, which includes the sample
itself (GRPO's group mean: biased by a factor (G − 1)/G, a scale). Beside the exact KL (the full
estimator) the same term is −λ_R·Â·log p_S(x_t), masked and normalised as the divergence is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from mmopd.losses.chunks import LOGPROB_FLOOR, check_chunk_size, check_temperature, rows_per_chunk, scaled_float


def _token_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: [n, V], [n] -> log_softmax(z / τ) at the tokens [n] float32."""
    z = scaled_float(logits, temperature)  # [n, V]
    return z.gather(1, tokens[:, None]).squeeze(1) - z.logsumexp(-1)


def _token_logprob_grad(logits: torch.Tensor, tokens: torch.Tensor, grad_out: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """One chunk: grad_out[n] · (onehot(x) − p) / τ as [n, V] float32."""
    g = grad_out[:, None]  # [n, 1]
    grad = torch.softmax(scaled_float(logits, temperature), dim=-1)  # [n, V]
    grad.mul_(-g).scatter_add_(1, tokens[:, None], g)
    return grad.div_(temperature)


class _ChunkedSampledLogprobs(torch.autograd.Function):
    """Chunked log-softmax gathered at given tokens; saves only logits and tokens."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):
        # logits: [N, V], tokens: [N] long
        num_rows, vocab = logits.shape
        rows = rows_per_chunk(num_rows, vocab, chunk_size)
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
    check_temperature(temperature)
    check_chunk_size(chunk_size)
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



@dataclass(frozen=True)
class Shaping:
    """How shaped_sampled_loss shapes the coefficient (objective.sampled_kl, .baseline, .advantage_clip)."""

    kl: str = "k1"
    baseline: str = "none"
    group: int = 1  # rollout.samples_per_prompt: consecutive rows that share a prompt
    clip: float = 0.0
    kl_weight: float = 1.0  # objective.kl_weight: λ_KL, the KL term's weight in the advantage

    @property
    def plain(self) -> bool:
        """Whether this is the unshaped estimator, sampled_reverse_kl_loss."""
        return self.kl == "k1" and self.baseline == "none" and self.clip == 0 and self.kl_weight == 1


def leave_one_out_mean(values: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """Per position, the mean of `values` over the other rows of its group (consecutive rows of `group`
    samples of one prompt) that reach that position; 0 where none does. [B, T], [B, T] -> [B, T]"""
    rows, length = values.shape
    v = (values * mask).view(rows // group, group, length)  # [P, G, T]
    m = mask.to(values.dtype).view(rows // group, group, length)  # [P, G, T]
    others = (v.sum(1, keepdim=True) - v) / (m.sum(1, keepdim=True) - m).clamp(min=1)  # [P, G, T]
    return others.reshape(rows, length)


def shaped_sampled_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    shaping: Shaping,
    behaviour_logprobs: torch.Tensor | None = None,
    reward: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sampled_reverse_kl_loss with its coefficient shaped (module docstring): a leave-one-out baseline over
    groups of `shaping.group` rows or over the batch, a clip of the log-ratio at ±`shaping.clip` (0: none), or verl's k3 in
    place of k; weighted by `shaping.kl_weight`, with `reward` (λ_R·Â per row [B], or None) in the advantage.
    [B, T] each -> ([B, T] per-token loss, [B, T] reverse-KL estimate k), float32."""
    student = student_logprobs.float()  # [B, T]
    behaviour = student if behaviour_logprobs is None else behaviour_logprobs.float()  # [B, T]
    teacher = teacher_logprobs.detach().float().clamp(min=LOGPROB_FLOOR)  # [B, T]
    kl_estimate = student.detach().clamp(min=LOGPROB_FLOOR) - teacher  # [B, T]
    if shaping.kl == "k3":  # the pathwise gradient of verl's low_var_kl
        log_ratio = (teacher - student.clamp(min=LOGPROB_FLOOR)).clamp(-20.0, 20.0)  # log r, with gradient
        k3 = (log_ratio.exp() - log_ratio - 1).clamp(-10.0, 10.0)
        per_token = torch.exp(student - behaviour).detach() * k3
        if shaping.kl_weight != 1 or reward is not None:
            per_token = shaping.kl_weight * per_token + _reward_term(student, behaviour, reward)
        return per_token, kl_estimate
    coefficient = kl_estimate
    if shaping.baseline != "none":  # loo: over the prompt's samples; batch: over every row of the batch
        group = shaping.group if shaping.baseline == "loo" else kl_estimate.shape[0]
        coefficient = coefficient - leave_one_out_mean(kl_estimate, mask, group)
    if shaping.clip > 0:
        coefficient = coefficient.clamp(-shaping.clip, shaping.clip)
    if shaping.kl_weight != 1 or reward is not None:  # A_t = −λ_KL·c_t + λ_R·Â
        coefficient = shaping.kl_weight * coefficient - (0.0 if reward is None else reward[:, None])
    return torch.exp(student - behaviour.detach()) * coefficient, kl_estimate


def _reward_term(student: torch.Tensor, behaviour: torch.Tensor, reward: torch.Tensor | None) -> torch.Tensor:
    """−ρ·λ_R·Â per token: [B, T], [B, T], [B] or None -> [B, T] (0 without a reward)."""
    if reward is None:
        return torch.zeros_like(student)
    return -torch.exp(student - behaviour.detach()) * reward[:, None]


def reward_advantage(rewards: torch.Tensor, group: int, baseline: bool, scale: bool) -> torch.Tensor:
    """Â per response: R − b, b the mean reward of its prompt's samples (`group` consecutive rows) where
    `baseline`, divided by (σ + 1e-6), σ their unbiased std, where `scale` (GRPO). [B] -> [B] float32"""
    advantage = rewards.float()  # [B]
    grouped = advantage.view(-1, group)  # [P, G]
    if baseline:
        grouped = grouped - grouped.mean(1, keepdim=True)
    if scale:
        grouped = grouped / (advantage.view(-1, group).std(1, keepdim=True) + 1e-6)
    return grouped.reshape(-1)


def policy_gradient_loss(student_logprobs: torch.Tensor, reward: torch.Tensor,
                         behaviour_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """The reward's term alone, per token: −λ_R·Â·log p_S(x) (no behaviour: the score-function form beside the
    exact KL), or −ρ·λ_R·Â with ρ = exp(log p_S − log π_b) (the sampled estimator's form: the same gradient
    on-policy). [B, T], [B] (λ_R·Â) -> [B, T] float32"""
    student = student_logprobs.float()  # [B, T]
    if behaviour_logprobs is None:
        return -student * reward[:, None]
    return _reward_term(student, behaviour_logprobs.float(), reward)
