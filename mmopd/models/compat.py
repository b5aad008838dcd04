"""Checks, before step 1, that a teacher can score a student's tokens: the same tokenizer, or (text) another one whose
reading of the student's text can be aligned with it (mmopd/step/cross_tokenizer.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn


log = logging.getLogger("mmopd")
REPRODUCED_FLOOR = 0.5  # the least share of the student's token texts the teacher's tokenizer must give back


class IncompatibleModelsError(ValueError):
    """Student and teacher cannot be distilled as configured; the message says what differs."""


def same_tokenizer(student_tok: Any, teacher_tok: Any) -> bool:
    """Whether the teacher reads the student's token ids as they are: one vocabulary, the same EOS and PAD."""
    same = ("eos_token_id", "pad_token_id")
    return student_tok.get_vocab() == teacher_tok.get_vocab() and all(
        getattr(student_tok, name, None) == getattr(teacher_tok, name, None) for name in same)


@dataclass(frozen=True)
class VocabularyOverlap:
    """How much of the student's vocabulary, as text, the teacher's tokenizer reads."""

    reproduced: float  # share of the student's token texts the teacher encodes and decodes back unchanged
    shared: float  # share of the student's token texts that are one teacher token's text
    example: str  # a token text the teacher does not give back ("" where none), and what it gives instead


def vocabulary_overlap(student_tok: Any, teacher_tok: Any) -> VocabularyOverlap:
    """The student's token texts (special tokens and partial characters left out) through the teacher's tokenizer."""
    special = set(student_tok.all_special_ids)
    texts = [t for i, t in enumerate(student_tok.batch_decode([[i] for i in range(len(student_tok))]))
             if i not in special and t and "\ufffd" not in t]
    if not texts:
        return VocabularyOverlap(0.0, 0.0, "")
    encoded = teacher_tok(texts, add_special_tokens=False)["input_ids"]
    back = teacher_tok.batch_decode(encoded, clean_up_tokenization_spaces=False)
    lost = [(t, b) for t, b in zip(texts, back) if t != b]
    teacher_texts = set(teacher_tok.batch_decode([[i] for i in range(len(teacher_tok))]))
    example = f"{lost[0][0]!r} reads back as {lost[0][1]!r}" if lost else ""
    return VocabularyOverlap(1 - len(lost) / len(texts), sum(t in teacher_texts for t in texts) / len(texts), example)


def check_cross_tokenizer(student_tok: Any, teacher_tok: Any) -> VocabularyOverlap:
    """Refuse a teacher whose tokenizer cannot be aligned with the student's text: either without character offsets
    (a slow tokenizer), or one that reads most of the student's token texts back as other text (another
    normalisation: lower-casing, accents stripped). Logs and returns the overlap."""
    for role, tok in (("teacher", teacher_tok), ("student", student_tok)):
        if not getattr(tok, "is_fast", False):
            raise IncompatibleModelsError(
                f"the teacher's tokenizer differs from the student's, and the {role}'s is a slow tokenizer "
                f"({type(tok).__name__}) without character offsets, which cross-tokenizer alignment needs; give "
                f"the {role} a tokenizer.json")
    overlap = vocabulary_overlap(student_tok, teacher_tok)
    if overlap.reproduced < REPRODUCED_FLOOR:
        raise IncompatibleModelsError(
            f"the teacher's tokenizer gives back only {overlap.reproduced:.0%} of the student's token texts unchanged "
            f"({overlap.example}): it normalises text another way, so it would score other text than the student "
            "wrote; use a teacher whose tokenizer keeps the student's text")
    log.info("the teacher's tokenizer differs from the student's: responses are aligned by character spans and "
             "scored with the sampled span estimator; %.0f%% of the student's token texts are one teacher token, "
             "%.0f%% read back unchanged", 100 * overlap.shared, 100 * overlap.reproduced)
    return overlap


def check_same_vocab(student_tok: Any, teacher_tok: Any, show: int = 8) -> None:
    """Both tokenizers must map the same strings to the same ids, with the same EOS and PAD."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        diffs = []
        for token in sorted(set(s_vocab) | set(t_vocab), key=lambda t: min(s_vocab.get(t, 1 << 62), t_vocab.get(t, 1 << 62))):
            if s_vocab.get(token) != t_vocab.get(token):
                diffs.append(f"{token!r}: student id {s_vocab.get(token)}, teacher id {t_vocab.get(token)}")
            if len(diffs) == show:
                break
        n_diff = sum(s_vocab.get(t) != t_vocab.get(t) for t in set(s_vocab) | set(t_vocab))
        raise IncompatibleModelsError(
            f"student and teacher tokenizers differ ({len(s_vocab)} vs {len(t_vocab)} tokens, {n_diff} differ), "
            "so the teacher cannot score the student's tokens. First differences:\n  " + "\n  ".join(diffs)
            + "\nUse a teacher and student from the same tokenizer family."
        )
    for name in ("eos_token_id", "pad_token_id"):
        s_id, t_id = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if s_id != t_id:
            raise IncompatibleModelsError(
                f"student and teacher tokenizers share a vocabulary but not {name} ({s_id} vs {t_id}); "
                "responses would end differently. Set the same special tokens on both."
            )


def check_embedding_rows(model: nn.Module, role: str, needed: int) -> None:
    """A model's output rows must cover the tokenizer (padded rows beyond it are fine)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < needed:
        raise IncompatibleModelsError(
            f"the {role}'s LM head has {rows} rows but its tokenizer has {needed} tokens; "
            "the model and tokenizer do not belong together"
        )
