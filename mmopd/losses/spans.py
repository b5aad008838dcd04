r"""The sampled estimator over spans, for a teacher with another tokenizer (mmopd/step/cross_tokenizer.py cuts the
response into spans: student tokens x_a … x_{b−1} and teacher tokens y_c … y_{d−1} that spell the same text).

Per span j (log-probs floored at LOGPROB_FLOOR, detached)::

    log p_S(span_j) = Σ_{i=a}^{b−1} log p_S(x_i | x_<i)
    log p_T(span_j) = Σ_{t=c}^{d−1} log p_T(y_t | y_<t)
    k_j = log p_S(span_j) − log p_T(span_j)                the span's log-ratio
    A_i = −k_j  for every student token i of span j       (advantage, discount 0 per span)
    loss = Σ_i −ρ_i·A_i
    ∇loss = Σ_j k_j·Σ_{i∈j} ρ_i·∇log p_S(x_i) = Σ_j k_j·∇log p_S(span_j)     (on-policy, ρ = 1)

Σ_j k_j = log p_S(response) − log p_T(its text in the teacher's tokens): the sequence's log-ratio, whose
expectation under the student is the reverse KL between the two models' distributions over texts (where each puts
its mass on the tokenisations compared). As the per-token estimator credits a token with its own log-ratio only
(discount 0), the span estimator credits a span's tokens with the span's: exact for what it estimates, and the same
values where every span is one token on each side.

It reuses the per-token estimator (`shaped_sampled_loss`, so shaping and rewards apply unchanged) through the
teacher's *per-token equivalent*: the value that makes the token's log-ratio the span's::

    t_i = log p_T(span_j) − (log p_S(span_j) − log p_S(x_i))    ⇒    log p_S(x_i) − t_i = k_j

For a one-token span it is log p_T(y_c) itself, bit for bit (an empty sum is 0). The estimate logged per token is
k_j / (b − a), so a response's tokens sum to its log-ratio.

**Canonical tokenisations.** Compared with log p_T(text), the reverse KL over the student's token sequences y,
E_y~p_S[log p_S(y) − log p_T(text(y))], is least at p_S(y) ∝ p_T(text(y)) over *every* y, including the
tokenisations the student's tokenizer never makes ("1", "3", ";" for its "13;"): a text with n spellings weighs
n times its probability, and the student learns to spread over spellings (and to favour texts with many). The
target is held to the student's canonical tokenisations instead::

    q(y) = p_T(text(y)) · 1[y is the student's tokenizer's encoding of text(y)]

which sums to 1 over y (one canonical y per text), so the optimum is p_S(y) = p_T(text(y)) on canonical y and 0
elsewhere. log 1[·] = −∞ is relaxed to a penalty of NONCANONICAL_PENALTY nats per span that holds a token the
student's tokenizer would not make there (mmopd/step/cross_tokenizer.py, `canonical_tokens`)::

    log q(span_j) = log p_T(span_j) − NONCANONICAL_PENALTY · 1[span_j not canonical]

so such a span's log-ratio, the advantage of its tokens, is NONCANONICAL_PENALTY lower. A canonical span, and so
every span of identical tokenizers, is scored as before, bit for bit.
"""

from __future__ import annotations

import torch

from mmopd.losses.chunks import LOGPROB_FLOOR

NONCANONICAL_PENALTY = 20.0  # nats off log p_T of a span the student's tokenizer would not spell so (docstring)


def span_totals(values: torch.Tensor, span: torch.Tensor, spans: int) -> torch.Tensor:
    """Per row, the sum of `values` over each span's tokens (spans numbered per row, below `spans`; −1: none).
    [B, L], [B, L] long -> [B, spans]"""
    kept = span >= 0  # [B, L]
    rows = torch.arange(span.shape[0], device=span.device)[:, None] * spans  # [B, 1]
    totals = values.new_zeros(span.shape[0] * spans).index_add_(0, (span + rows)[kept], values[kept])
    return totals.view(-1, spans)  # [B, spans]


def at_spans(totals: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Per token, its span's entry of `totals`; 0 where no span. [B, S], [B, T] long -> [B, T]"""
    return torch.where(span >= 0, totals.gather(1, span.clamp(min=0)), 0.0)


def span_sums(values: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Per token, the sum of `values` over the tokens of its span; 0 where no span. [B, T], [B, T] -> [B, T]"""
    return at_spans(span_totals(values, span, span.shape[1]), span)


def span_token_logprobs(student_logprobs: torch.Tensor, teacher_span_logprobs: torch.Tensor,
                        span: torch.Tensor, canonical: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's per-token equivalent t_i (module docstring), NONCANONICAL_PENALTY lower in a span with a token
    that is not `canonical`, 0 where no span is scored. [B, T] student log-probs, [B, T] log p_T of each token's
    span, [B, T] span ids, [B, T] bool or None (all canonical) -> [B, T] float32"""
    student = student_logprobs.detach().float().clamp(min=LOGPROB_FLOOR)  # [B, T]
    others = span_sums(student, span) - student  # [B, T] the span's other student tokens
    teacher = teacher_span_logprobs.float()  # [B, T]
    if canonical is not None:
        off = span_sums((~canonical).float(), span) > 0  # [B, T] the token's span holds a non-canonical token
        teacher = teacher - NONCANONICAL_PENALTY * off
    return torch.where(span >= 0, teacher - others, 0.0)


def span_share(values: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Each token's share of its span's value, value / (tokens in the span); 0 where no span. [B, T] -> [B, T]"""
    counts = span_sums(torch.ones_like(values), span)  # [B, T]
    return torch.where(span >= 0, values / counts.clamp(min=1), 0.0)
