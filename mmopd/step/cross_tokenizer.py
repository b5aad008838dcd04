"""A teacher with another tokenizer: the student's response re-tokenized for the teacher, and the two token
sequences cut into spans on the character boundaries they share.

For one response (the student's ids up to its first EOS):

1. the student's ids decode to the text `s`; a special token other than EOS decodes to its own text ("<|im_sep|>"),
   which the teacher's tokenizer reads as its own special token of that name where it has one (identical
   tokenizers so give identical ids), and as plain text otherwise;
2. the teacher's tokenizer encodes `s` alone (the teacher's prompt is encoded apart, as the student's was), with
   its character offsets into `s`;
3. each side's *cuts* are the character positions between two of its tokens:
   - student: after token i where decoding ids[:i+1] gives exactly s[:p] (decoding a prefix, not concatenating
     tokens' strings, so a token that carries part of a multi-byte UTF-8 character, a byte-fallback piece, makes
     no cut inside the character, and a tokenizer's whitespace handling in decoding is its own);
   - teacher: between tokens j and j+1 by their character offsets. The byte pieces of one character share its
     offsets: no cut between them. Characters no teacher token covers lie between two tokens: whitespace goes
     with the token after it (a byte-level pre-tokenizer that trims offsets leaves out the space of " world"),
     anything else with the token before it (the combining mark an NFC/NFKC normaliser composed into "é"), and a
     mix of both makes no cut;
4. the spans lie between the positions both sides cut at: each holds ≥ 1 token on each side, and its student
   tokens and its teacher tokens spell the same characters of `s`. Tokens that decode to nothing join the span
   before them; a response whose text is empty has no span but its EOS.

EOS: a response that ended (the student sampled one of its EOS ids) gets one more span, the student's EOS against
the teacher's EOS. A response cut at `rollout.max_new_tokens` has no EOS, and its last span is dropped unless it is
one token on each side (its student tokens are scored by no span, and the loss leaves them out): the text may stop
inside what the teacher would have made one token (the student's "h", "el" of "hello"), and the teacher's encoding
of a cut text ("hel") is then a path the teacher would not take. A one-to-one last span is kept: the teacher scores
the very string the student's last token spells, as the same-tokenizer estimator would (so identical tokenizers
give the same loss on cut responses too).

`SpanLogprobs` (mmopd/step/scores.py) carries, per student token, log p_T of its span: the sum of the teacher's
log-probs of the span's teacher tokens (each floored at LOGPROB_FLOOR as the per-token estimator floors them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmopd.losses import LOGPROB_FLOOR, at_spans, span_totals
from mmopd.step.scores import SpanLogprobs

Span = tuple[int, int, int, int]  # student tokens [a, b), teacher tokens [c, d)


def decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of `ids` as alignment reads it: special tokens as their text, no clean-up of spaces."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def student_cuts(tokenizer: Any, ids: list[int]) -> tuple[str, list[int | None]]:
    """The text of the student's `ids` and, per token, the position in it after the token, or None where decoding
    the ids up to it gives no prefix of the text (inside a character, or a decoder that reads ahead).

    Where the tokens decoded one by one spell the text, whole characters each (byte-level, character and fused
    decoders on text without partial characters), their lengths are the cuts: O(T). Otherwise every prefix is
    decoded: O(T²) characters, the reference."""
    text = decode(tokenizer, ids)
    if not ids:
        return text, []
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "".join(pieces) == text and "\ufffd" not in text:
        return text, list(itertools.accumulate(len(p) for p in pieces))
    return text, prefix_cuts(tokenizer, ids, text)


def prefix_cuts(tokenizer: Any, ids: list[int], text: str) -> list[int | None]:
    """Per token, len(decode(ids[:i + 1])) where that is a prefix of `text` (the text of all `ids`), else None."""
    prefixes = tokenizer.batch_decode([ids[:i] for i in range(1, len(ids))], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
    return [len(p) if text.startswith(p) else None for p in prefixes] + [len(text)]


def encoded_cuts(tokenizer: Any, text: str) -> tuple[list[int], list[int | None]]:
    """A tokenizer's ids for `text` (the teacher's, or the student's own canonical ones) and, per token, the position after it (its end offset), or None where the next
    token does not start there (byte pieces of one character share offsets; uncovered characters lie between)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        return [], []
    return ids, [_cut(text, end, nxt) for (_, end), (nxt, _) in zip(offsets, offsets[1:])] + [len(text)]


def _cut(text: str, end: int, start: int) -> int | None:
    """Where the teacher cuts between a token ending at `end` and the next starting at `start` (module docstring)."""
    gap = text[end:start]
    if start < end or (gap and not gap.isspace() and any(c.isspace() for c in gap)):
        return None
    return end if not gap or gap.isspace() else start


def shared_spans(student_ends: list[int | None], teacher_ends: list[int | None], length: int) -> list[Span]:
    """The spans between the positions both sides cut at (module docstring), in order; none for an empty text."""
    if length == 0 or not student_ends or not teacher_ends:
        return []
    s_last = {p: i for i, p in enumerate(student_ends) if p is not None}  # a position's last token: zero-width
    t_last = {p: j for j, p in enumerate(teacher_ends) if p is not None}  # tokens join the span before them
    spans: list[Span] = []
    s0 = t0 = 0
    for p in sorted(s_last.keys() & t_last.keys()):
        s1, t1 = s_last[p] + 1, t_last[p] + 1
        if p > 0 and s1 > s0 and t1 > t0:
            spans.append((s0, s1, t0, t1))
            s0, t0 = s1, t1
    return spans


def canonical_tokens(tokenizer: Any, ids: list[int], text: str, ends: list[int | None]) -> list[bool]:
    """Per sampled token (its `ends` from student_cuts), whether the student's tokenizer makes it when it encodes
    `text`: aligned with that encoding as with the teacher's, the token's span holds the same ids on both sides. A
    student that drifts to tokenisations its tokenizer never makes shows here (the README: the span estimator does
    not penalise it)."""
    canon_ids, canon_ends = encoded_cuts(tokenizer, text)
    flags = [False] * len(ids)
    for a, b, c, d in shared_spans(ends, canon_ends, len(text)):
        flags[a:b] = [ids[a:b] == canon_ids[c:d]] * (b - a)
    return flags


def extendable_ids(tokenizer: Any) -> list[int]:
    """The ids of the tokens whose text is a proper prefix of another token's text ("1" of "13;"), special tokens
    aside: whether such a token is canonical where it is sampled depends on the text after it."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ordered = sorted(set(texts))  # a text that begins another is followed in this order by one that begins with it
    extended = {t for t, after in zip(ordered, ordered[1:]) if t and after.startswith(t)}
    return [i for i, t in zip(ids, texts) if t in extended]


@dataclass(frozen=True)
class RowAlignment:
    """One response aligned: the teacher's ids for it and the spans (student [a, b) against teacher [c, d))."""

    teacher_ids: list[int]
    spans: list[Span]
    canonical: list[bool]  # per student token up to its EOS (the EOS counts as canonical)


@dataclass(frozen=True)
class AlignedBatch:
    """A batch of responses aligned, as tensors. Spans are numbered per row, in order."""

    teacher_ids: Tensor  # [B, Tt] long, the teacher's pad after each row's ids
    student_span: Tensor  # [B, T] long, the span of each student token, -1 where none is scored
    teacher_span: Tensor  # [B, Tt] long, the span of each teacher token, -1 where none is scored
    one_to_one: Tensor  # [B, T] bool, the token's span is one token on each side
    canonical: Tensor  # [B, T] bool, the student's tokenizer makes the token (canonical_tokens)
    extendable: Tensor  # [B, T] bool, the token's text begins another student token's (`extendable_ids`)

    def span_logprobs(self, teacher_logprobs: Tensor) -> SpanLogprobs:
        """Per student token, the teacher's log-prob of its span: Σ over the span's teacher tokens of
        max(log p_T, LOGPROB_FLOOR). [B, Tt] -> SpanLogprobs [B, T]"""
        floored = teacher_logprobs.float().clamp(min=LOGPROB_FLOOR)  # [B, Tt]
        totals = span_totals(floored, self.teacher_span, self.student_span.shape[1])  # [B, T]: < T spans a row
        values = at_spans(totals, self.student_span)  # [B, T]
        return SpanLogprobs(values, self.student_span, self.one_to_one, self.canonical, self.extendable)


class Aligner:
    """Aligns the student's sampled responses with the teacher's tokenizer (module docstring)."""

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any, student_eos: list[int], teacher_eos: int,
                 teacher_pad: int):
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        self.student_eos, self.teacher_eos, self.teacher_pad = set(student_eos), teacher_eos, teacher_pad
        self.extendable = torch.tensor(extendable_ids(student_tokenizer), dtype=torch.long)

    def row(self, ids: list[int]) -> RowAlignment:
        """One response's alignment; `ids` run to the student's first EOS, or are cut at max_new_tokens."""
        end = next((i for i, t in enumerate(ids) if t in self.student_eos), None)
        response = ids if end is None else ids[:end]
        text, s_ends = student_cuts(self.student, response)
        t_ids, t_ends = encoded_cuts(self.teacher, text)
        spans = shared_spans(s_ends, t_ends, len(text))
        canonical = canonical_tokens(self.student, response, text, s_ends)
        if end is None:  # cut at max_new_tokens: the last span may stop inside a teacher token
            one_to_one = bool(spans) and spans[-1][1] - spans[-1][0] == 1 and spans[-1][3] - spans[-1][2] == 1
            return RowAlignment(t_ids, spans if one_to_one else spans[:-1], canonical)
        return RowAlignment(t_ids + [self.teacher_eos], spans + [(end, end + 1, len(t_ids), len(t_ids) + 1)],
                            canonical + [True])

    def batch(self, tokens: Tensor) -> AlignedBatch:
        """The responses [B, T] aligned; the teacher's rows are at least T long (the same width for the same
        tokenizer)."""
        B, T = tokens.shape
        rows = [self.row(ids) for ids in tokens.tolist()]
        Tt = max([T] + [len(r.teacher_ids) for r in rows])
        teacher_ids = torch.full((B, Tt), self.teacher_pad, dtype=torch.long)
        student_span = torch.full((B, T), -1, dtype=torch.long)
        teacher_span = torch.full((B, Tt), -1, dtype=torch.long)
        one_to_one = torch.zeros((B, T), dtype=torch.bool)
        canonical = torch.zeros((B, T), dtype=torch.bool)
        for b, r in enumerate(rows):
            teacher_ids[b, :len(r.teacher_ids)] = torch.tensor(r.teacher_ids, dtype=torch.long)
            canonical[b, :len(r.canonical)] = torch.tensor(r.canonical, dtype=torch.bool)
            for k, (s0, s1, t0, t1) in enumerate(r.spans):
                student_span[b, s0:s1] = k
                teacher_span[b, t0:t1] = k
                one_to_one[b, s0:s1] = s1 - s0 == 1 and t1 - t0 == 1
        device = tokens.device
        extendable = torch.isin(tokens.cpu(), self.extendable)  # [B, T]
        return AlignedBatch(teacher_ids.to(device), student_span.to(device), teacher_span.to(device),
                            one_to_one.to(device), canonical.to(device), extendable.to(device))
