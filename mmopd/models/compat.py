"""Checks, before step 1, that a teacher can score a student's tokens."""

from __future__ import annotations

from typing import Any

from torch import nn


class IncompatibleModelsError(ValueError):
    """Student and teacher cannot be distilled as configured; the message says what differs."""


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
