"""A teacher with privileged context: a record's teacher-only prompt (on-policy self-distillation: OPSD, SDFT, SDPO).

A record may carry a second prompt in `data.teacher_prompt_field` (default `"teacher_prompt"`), a non-empty string
the teacher reads instead of `prompt`: the reference answer, a hint, a longer instruction. The student never sees it:
it samples, is scored and trained after `prompt`; the teacher scores the same response tokens after its own prompt,

    loss = Σ_t KL( p_S(· | prompt, x_<t) ‖ p_T(· | teacher_prompt, x_<t) ),

so the teacher may be the student's own starting checkpoint, whose gradient without the privileged prompt is 0.
A record without the field gives its teacher `prompt` (the count is logged at start; a field other than the default
that no training record carries is refused, as a misspelling). For a VLM only the text differs: the record's pictures stay, placed as for a plain
prompt. The check is the adapter's record check wrapped (`privileged_check`); the step reads the teacher's view of
its records (`teacher_view`), which every teacher engine then encodes as it encodes any prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mmopd.data.records import RecordError

TEACHER_PROMPT = "_teacher_prompt"  # the checked record's key holding its teacher-only prompt


def privileged_check(check: Callable[[dict, Path], dict], field: str,
                     refusal: str | None = None) -> Callable[[dict, Path], dict]:
    """The adapter's record check, plus the record's teacher-only prompt from `field` (a non-empty string, kept
    under TEACHER_PROMPT); `refusal`: why this modality takes none (a record carrying one is then an error)."""

    def checked(raw: dict, base_dir: Path) -> dict:
        record = check(raw, base_dir)
        value = raw.get(field)
        if value is None:
            return record
        if refusal is not None:
            raise RecordError(f"{field!r} (a teacher-only prompt) is not supported here: {refusal}")
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"{field!r} (the teacher's prompt) must be a non-empty string, got "
                              f"{type(value).__name__ if not isinstance(value, str) else 'an empty string'}")
        record[TEACHER_PROMPT] = value
        return record

    return checked


def teacher_view(records: list[dict]) -> list[dict]:
    """The records as the teacher reads them: `prompt` replaced by the teacher-only prompt where a record has one."""
    return [{**r, "prompt": r[TEACHER_PROMPT]} if TEACHER_PROMPT in r else r for r in records]


def privileged_count(records: list[dict]) -> int:
    """How many of `records` carry a teacher-only prompt."""
    return sum(TEACHER_PROMPT in r for r in records)
