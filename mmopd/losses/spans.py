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

so such a span's log-ratio, the advantage of its tokens, is NONCANONICAL_PENALTY lower.

**Tokens that a longer token extends: one span of lookahead.** Whether a sampled token is canonical can depend on
the text after it: "1" where the text goes on "3;" is not (the student's tokenizer makes "13;"), where it goes on
"#" it is. Discount 0 credits "1" with log p_T("1") alone, the teacher's mass of every text that begins "1",
"13;…" included, which the canonical "13;" also claims: at each position the per-span targets overcount (Σ_x
p_T(text(x)) > 1 over the student's tokens), and the student learns to leave its "13;" for "1" (measured: its
one-to-one share climbs from 0.65 to 0.93 and it loops, README). After "1" the teacher's "3;" is penalised as
non-canonical, so the student's "1" leads where the teacher puts little mass: the next span shows it. A span
whose last student token is *extendable* (its text is a proper prefix of another student token's,
mmopd/step/cross_tokenizer.py `extendable_ids`) is credited with the next span's log-ratio too::

    A_i = −(k_j + e_j·k_{j+1})      e_j = 1[span j ends in an extendable token]

the return over the next span (discount 1 there, 0 beyond), the shortest horizon that sees the text after the
token. The full return (discount 1 to the end) is the unbiased gradient of the sequence-level reverse KL to q, but
on the toy it collapses to an immediate EOS within 30 steps (measured, README); one span of lookahead keeps the
per-span estimator's variance. The logged estimate stays k_j / (b − a).

A canonical span not ending in an extendable token, and so every span of identical character-level tokenizers,
is scored as before, bit for bit.
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


def span_log_ratios(student: torch.Tensor, teacher: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Per row, each span's log-ratio k_j = Σ log p_S − log p_T(span_j) (0 past a row's spans).
    [B, T] student log-probs, [B, T] log q of each token's span, [B, T] span ids -> [B, S = T]"""
    spans = span.shape[1]
    slot = torch.where(span >= 0, span, spans)  # [B, T]: tokens of no span write to one slot more
    teacher_totals = teacher.new_zeros(span.shape[0], spans + 1).scatter_(1, slot, teacher)[:, :spans]  # [B, S]
    return span_totals(student, span, spans) - teacher_totals


def lookahead(student: torch.Tensor, teacher: torch.Tensor, span: torch.Tensor,
              extendable: torch.Tensor | None) -> torch.Tensor:
    """Per token, the next span's log-ratio k_{j+1} where its span j ends in an `extendable` token, else 0 (module
    docstring). [B, T] student log-probs, [B, T] log q of each token's span, [B, T] span ids, [B, T] bool -> [B, T]"""
    if extendable is None:
        return torch.zeros_like(student)
    k = span_log_ratios(student, teacher, span)  # [B, S]
    following = torch.cat([k[:, 1:], torch.zeros_like(k[:, :1])], dim=1)  # [B, S] k_{j+1}, 0 after the last
    ends = torch.ones_like(extendable)  # [B, T] the token is its span's last
    ends[:, :-1] = span[:, :-1] != span[:, 1:]
    flagged = span_totals((extendable & ends & (span >= 0)).float(), span, span.shape[1]) > 0  # [B, S]
    return at_spans(torch.where(flagged, following, 0.0), span)


def span_targets(student_logprobs: torch.Tensor, teacher_span_logprobs: torch.Tensor, span: torch.Tensor,
                 canonical: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probs as the estimator reads them (detached, floored) and log q of each token's span:
    log p_T(span), NONCANONICAL_PENALTY lower where the span holds a token that is not `canonical` (None: all are).
    [B, T] each -> [B, T], [B, T] float32"""
    student = student_logprobs.detach().float().clamp(min=LOGPROB_FLOOR)  # [B, T]
    teacher = teacher_span_logprobs.float()  # [B, T]
    if canonical is not None:
        off = span_sums((~canonical).float(), span) > 0  # [B, T] the token's span holds a non-canonical token
        teacher = teacher - NONCANONICAL_PENALTY * off
    return student, teacher


def span_token_logprobs(student_logprobs: torch.Tensor, teacher_span_logprobs: torch.Tensor,
                        span: torch.Tensor, canonical: torch.Tensor | None = None,
                        extendable: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's per-token equivalent t_i (module docstring): log q of the token's span less its span's other
    student tokens, less the next span's log-ratio after an `extendable` token; 0 where no span is scored.
    [B, T] student log-probs, [B, T] log p_T of each token's span, [B, T] span ids, [B, T] bool or None (all
    canonical), [B, T] bool or None (none extendable) -> [B, T] float32"""
    student, teacher = span_targets(student_logprobs, teacher_span_logprobs, span, canonical)
    others = span_sums(student, span) - student  # [B, T] the span's other student tokens
    return torch.where(span >= 0, teacher - others - lookahead(student, teacher, span, extendable), 0.0)


def span_share(values: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Each token's share of its span's value, value / (tokens in the span); 0 where no span. [B, T] -> [B, T]"""
    counts = span_sums(torch.ones_like(values), span)  # [B, T]
    return torch.where(span >= 0, values / counts.clamp(min=1), 0.0)
