"""What a model says about each response position, in one of six forms, and the losses between them.

| form            | holds                                   | memory  | who makes it                          |
|-----------------|-----------------------------------------|---------|---------------------------------------|
| `Logits`        | logits over the action space [B, T, A]   | O(N·A)  | any in-process model                  |
| `Hidden`        | last hidden states [B, T, H] + LM head   | O(N·H)  | an in-process model with a plain head |
| `TopK`          | the K largest logits and their actions   | O(N·K)  | a teacher asked for top-k             |
| `TopKTail`      | K log-probs and actions, the rest a tail | O(N·K)  | a served teacher asked for top-k      |
| `TokenLogprobs` | log p of each sampled token [B, T]       | O(N)    | any engine that returns log-probs     |
| `SpanLogprobs`  | log p of each token's span [B, T]        | O(N)    | a teacher with another tokenizer      |

A student's scores (`Logits` or `Hidden`, with gradients) answer `logprobs(actions)`, `divergence(teacher, ...)`
and `sampled_loss(teacher, ...)`; which kernel of `mmopd.losses` runs depends on the pair of forms, and is
decided here, once. `Hidden` never builds [B, T, A] logits: the fused kernels make them one chunk of rows
at a time and compute the gradients alongside the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmopd.losses import (Shaping, excluded_logsumexp, fused_divergence_loss, fused_excluded_logsumexp,
                          fused_gathered_logits, fused_sampled_reverse_kl_loss, fused_token_logprobs, lookahead,
                          masked_mean, sampled_token_logprobs, shaped_sampled_loss, span_share, span_targets,
                          span_token_logprobs, tail_token_divergence, token_divergence, topk_token_divergence)
from mmopd.step.batch import Rollout, TokenSpace


class Scores:
    """The base of the forms. Methods a form cannot answer raise TypeError naming the form."""

    def logprobs(self, actions: Tensor, temperature: float = 1.0) -> Tensor:
        """log p of each action [B, T] -> [B, T] float32."""
        raise TypeError(f"{type(self).__name__} scores cannot give log-probs of arbitrary actions")

    def divergence(self, teacher: "Scores", mask: Tensor, kind: str, beta: float, temperature: float) -> Tensor:
        """The masked mean over response tokens of this student's divergence from `teacher`. -> []"""
        raise TypeError(f"{type(self).__name__} scores cannot be a student's side of a divergence")

    def sampled_loss(self, teacher: "TokenLogprobs", actions: Tensor, responses: Rollout,
                     temperature: float, shaping: Shaping = Shaping(),
                     reward: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The sampled-token estimator's loss (masked mean) and its per-token reverse-KL estimate, with a task
        reward's λ_R·Â per row [B] in the advantage where given. -> [], [B, T]"""
        student = self.logprobs(actions, temperature)  # [B, T]
        mask = teacher.scored(responses.mask)  # [B, T]
        per_token, kl_estimate = shaped_sampled_loss(student, teacher.against(student), mask, shaping,
                                                     responses.logprobs, reward)
        return masked_mean(per_token, mask), teacher.estimate(kl_estimate, student)

    def metrics(self, mask: Tensor) -> dict[str, float]:
        """What a teacher's scores say about themselves over the response tokens (`mask` [B, T]); nothing here."""
        return {}

    def nll(self, actions: Tensor, mask: Tensor) -> Tensor:
        """The masked mean negative log-likelihood of `actions`. -> []"""
        return masked_mean(-self.logprobs(actions), mask)


@dataclass
class Logits(Scores):
    values: Tensor  # [B, T, A] over the action space; row t scores tokens[:, t]

    def logprobs(self, actions: Tensor, temperature: float = 1.0) -> Tensor:
        return sampled_token_logprobs(self.values, actions, temperature=temperature)

    def divergence(self, teacher: Scores, mask: Tensor, kind: str, beta: float, temperature: float) -> Tensor:
        args = {"kind": kind, "beta": beta, "temperature": temperature}
        if isinstance(teacher, Logits):
            return masked_mean(token_divergence(self.values, teacher.values, **args), mask)
        if isinstance(teacher, TopK):
            return masked_mean(topk_token_divergence(self.values, teacher.logits, teacher.ids, **args), mask)
        if isinstance(teacher, TopKTail):  # K + 1 classes: the teacher's K ids and the rest
            student_topk = self.values.float().gather(-1, teacher.ids)  # [B, T, K]
            rest = excluded_logsumexp(self.values, teacher.ids, teacher.kept())  # [B, T]
            return masked_mean(tail_token_divergence(student_topk, rest, teacher.values, **args), mask)
        raise TypeError(f"a student's Logits cannot be compared with a teacher's {type(teacher).__name__}")


@dataclass
class Hidden(Scores):
    """What scores each response token before the LM head: logits = hidden·weightᵀ + bias."""

    hidden: Tensor  # [B, T, H] last hidden states; row t predicts tokens[:, t]
    weight: Tensor  # [V, H] the output projection (or [A, H] once restricted to a TokenSpace)
    bias: Tensor | None  # [V] or None
    logits_dtype: torch.dtype | None = None  # what the model's own head produced (bf16 under mixed precision)

    def restrict(self, space: TokenSpace) -> "Hidden":
        return Hidden(self.hidden, *space.restrict_head(self.weight, self.bias), self.logits_dtype)

    def head_precision(self) -> Any:
        """A context in which the losses' head matmuls run in the dtype the model's own head ran in: autocast
        when that differs from the weight's (fp32 master weights under bf16 mixed precision), else a no-op."""
        dtype = self.logits_dtype
        enabled = dtype in (torch.bfloat16, torch.float16) and dtype != self.weight.dtype
        return torch.autocast(self.weight.device.type, dtype=dtype if enabled else None, enabled=enabled)

    def logprobs(self, actions: Tensor, temperature: float = 1.0) -> Tensor:
        with self.head_precision():
            return fused_token_logprobs(self.hidden, self.weight, actions, temperature, bias=self.bias)

    def divergence(self, teacher: Scores, mask: Tensor, kind: str, beta: float, temperature: float) -> Tensor:
        args = {"kind": kind, "beta": beta, "temperature": temperature}
        if isinstance(teacher, Hidden):  # gradients computed with the values: no logits recomputed
            weights = mask / mask.sum().clamp(min=1)  # [B, T]
            with self.head_precision():
                return fused_divergence_loss(self.hidden, self.weight, teacher.hidden, teacher.weight, weights,
                                             student_bias=self.bias, teacher_bias=teacher.bias, **args)[0]
        if isinstance(teacher, TopK):  # the student's logits at the K ids only
            with self.head_precision():
                student_topk = fused_gathered_logits(self.hidden, self.weight, teacher.ids, bias=self.bias)
            return masked_mean(token_divergence(student_topk, teacher.logits, **args), mask)
        if isinstance(teacher, TopKTail):  # the K ids and the log-sum-exp of the rest, O(N·K) kept
            with self.head_precision():
                student_topk = fused_gathered_logits(self.hidden, self.weight, teacher.ids, bias=self.bias)
                rest = fused_excluded_logsumexp(self.hidden, self.weight, teacher.ids, teacher.kept(), bias=self.bias)
            return masked_mean(tail_token_divergence(student_topk, rest, teacher.values, **args), mask)
        raise TypeError(f"a student's Hidden scores cannot be compared with a teacher's {type(teacher).__name__}")

    def sampled_loss(self, teacher: "TokenLogprobs", actions: Tensor, responses: Rollout,
                     temperature: float, shaping: Shaping = Shaping(),
                     reward: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not shaping.plain or reward is not None:  # the shaped coefficient needs every k first: log-probs, then
            return super().sampled_loss(teacher, actions, responses, temperature, shaping, reward)  # the loss
        mask, values, student = teacher.scored(responses.mask), teacher.values, None  # [B, T] each
        if teacher.needs_student:  # the teacher's values depend on the student's log-probs (spans): one pass more
            with torch.no_grad():
                student = self.logprobs(actions, temperature)  # [B, T]
                values = teacher.against(student)
        weights = mask / mask.sum().clamp(min=1)  # [B, T]
        with self.head_precision():  # gradients computed with the values: no logits recomputed
            loss, kl_estimate = fused_sampled_reverse_kl_loss(self.hidden, self.weight, actions, values, weights,
                                                              responses.logprobs, temperature, bias=self.bias)
        return loss, teacher.estimate(kl_estimate, student)


@dataclass
class TopK(Scores):
    """A teacher's K largest logits per response position over the action space, and their action ids."""

    logits: Tensor  # [B, T, K] float32
    ids: Tensor  # [B, T, K] long, actions (indices into the TokenSpace)


@dataclass
class TopKTail(Scores):
    """A teacher's K largest log-probs per position (over its whole vocabulary, temperature 1) at their actions;
    the rest of its mass, 1 − Σ p, is one tail class (`mmopd.losses.tail`). A slot with log-prob −inf is unused
    (its id was outside the action space, or the position is past the response's end)."""

    values: Tensor  # [B, T, K] log-probs, float32, −inf for unused slots
    ids: Tensor  # [B, T, K] long, actions (0 for unused slots)

    def kept(self) -> Tensor:
        return self.values > float("-inf")  # [B, T, K] bool


@dataclass
class TokenLogprobs(Scores):
    """log p of each response token under a model (at the objective's temperature), and nothing else."""

    values: Tensor  # [B, T] float32
    needs_student = False  # whether `against` reads the student's log-probs

    def against(self, student: Tensor) -> Tensor:
        """What the sampled estimator compares the student's log-probs [B, T] with, per token: these values."""
        return self.values

    def scored(self, mask: Tensor) -> Tensor:
        """The response tokens the estimator scores, of `mask` [B, T]: all of them."""
        return mask

    def estimate(self, kl_estimate: Tensor, student: Tensor | None = None) -> Tensor:
        """The per-token reverse-KL estimate to log, from the estimator's [B, T]: as it is."""
        return kl_estimate


@dataclass
class SpanLogprobs(TokenLogprobs):
    """A teacher with another tokenizer (mmopd/step/cross_tokenizer.py): per student token, log p_T of the span it
    lies in (the sum over the span's teacher tokens); the sampled loss makes the span's log-ratio each of its
    tokens' (mmopd/losses/spans.py), penalised where a token is not canonical and with the next span's after an
    extendable token. Tokens of no scored span (a cut response's last span) are left out."""

    span: Tensor  # [B, T] long, the token's span within its row, −1 for none
    one_to_one: Tensor  # [B, T] bool, the token's span is one token on each side
    canonical: Tensor | None = None  # [B, T] bool, the student's own tokenizer makes the token (None: unknown)
    extendable: Tensor | None = None  # [B, T] bool, the token's text begins another student token's (None: none)

    needs_student = True

    def against(self, student: Tensor) -> Tensor:
        """The per-token equivalent of each token's span (mmopd/losses/spans.py), so its log-ratio is the span's, with
        the penalty of a span the student's tokenizer would not make (the target is its canonical tokenisations)."""
        return span_token_logprobs(student, self.values, self.span, self.canonical, self.extendable)

    def scored(self, mask: Tensor) -> Tensor:
        return mask * (self.span >= 0)  # [B, T]

    def estimate(self, kl_estimate: Tensor, student: Tensor | None = None) -> Tensor:
        """Each token's share of its span's log-ratio, the lookahead taken out (`student`: the log-probs [B, T] the
        estimator compared): a response's tokens sum to its log-ratio."""
        target = span_targets(student, self.values, self.span, self.canonical)
        return span_share(kl_estimate - lookahead(*target, self.span, self.extendable), self.span)

    def metrics(self, mask: Tensor) -> dict[str, float]:
        """`cross_tokenizer/one_to_one_share`: the share of response tokens in one-to-one spans;
        `cross_tokenizer/scored_share`: the share in any scored span; `cross_tokenizer/canonical_share`: the share
        the student's own tokenizer would make of the text."""
        tokens = mask.sum().clamp(min=1)
        shares = {"one_to_one_share": self.one_to_one, "scored_share": self.scored(mask), "canonical_share":
                  self.canonical}
        return {f"cross_tokenizer/{name}": ((value * mask).sum() / tokens).item() for name, value in shares.items()
                if value is not None}
