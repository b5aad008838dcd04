"""A teacher with another tokenizer as a `TeacherScorer`: it re-tokenizes the student's responses for the teacher
(mmopd/step/cross_tokenizer.py), has the teacher's own scorer (hf or any engine that returns token log-probs) score
the teacher's ids after the teacher's prompt, and hands the objective one `SpanLogprobs` over the student's tokens.

The objective step does not know: it asks its scorer for token log-probs and passes what comes back to the sampled
loss, which makes each span's log-ratio the advantage of the span's student tokens (mmopd/losses/spans.py).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mmopd.engines.base import TOKEN_LOGPROBS, TeacherNeed, TeacherScorer
from mmopd.models.adapter import ModalityAdapter
from mmopd.step.batch import PromptBatch
from mmopd.step.cross_tokenizer import Aligner
from mmopd.step.scores import SpanLogprobs


class CrossTokenizerTeacher:
    """Scores the student's responses [B, T] with a teacher that reads other tokens. -> SpanLogprobs [B, T]"""

    def __init__(self, inner: TeacherScorer, aligner: Aligner):
        self.inner, self.aligner = inner, aligner

    def score(self, prompts: PromptBatch, tokens: Tensor, need: TeacherNeed) -> SpanLogprobs:
        if need.what != TOKEN_LOGPROBS:
            raise ValueError(f"a teacher with another tokenizer scores token log-probs only (estimator sampled), "
                             f"not {need.what}")
        aligned = self.aligner.batch(tokens)
        teacher = self.inner.score(prompts, aligned.teacher_ids, need)  # TokenLogprobs [B, Tt]
        return aligned.span_logprobs(teacher.values)


def cross_tokenizer_teacher(inner: TeacherScorer, adapter: ModalityAdapter, student_processor: Any,
                            teacher_processor: Any) -> CrossTokenizerTeacher:
    """`inner` (the teacher's scorer over its own token space) behind the alignment of the student's responses."""
    return CrossTokenizerTeacher(inner, Aligner(student_processor, teacher_processor,
                                                adapter.eos_token_ids(student_processor),
                                                adapter.eos_token_ids(teacher_processor)[0],
                                                teacher_processor.pad_token_id))
