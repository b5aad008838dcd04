"""The VLM run report: a PNG grid of eval pictures, each with its question, the reference answer and
the greedy answers of the teacher, the student before distillation and the student after."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mmopd.run.evaluation import evaluate_policy
from modalities.vlm.adapter import normalize_answer
from modalities.vlm.images import load_rgb

GRID_EXAMPLES = 12
COLUMNS = 4
THUMB = 128
TEXT_LINES = 7
LINE = 14


def answers_of(session: Any, model: Any, processor: Any, records: list[dict]) -> list[str]:
    result = evaluate_policy(session.side(model, processor), records, session.config.rollout.max_new_tokens,
                             session.config.train.eval_batch_size, session.device)
    return result["responses"]


def write(out_dir: Path, session: Any, summary: dict[str, Any]) -> None:
    """The end-of-run report (the `mmopd.reports` entry point): the answer grid."""
    write_answer_grid(out_dir, session)


def write_answer_grid(out_dir: Path, session: Any, n: int = GRID_EXAMPLES) -> Path | None:
    """plots/answers.png for the first n eval records; None when the run has no eval split."""
    if session.eval_data is None:
        return None
    records = session.eval_data.records[:n]
    rows: dict[str, list[str]] = {}
    if session.teacher is not None:
        rows["teacher"] = answers_of(session, session.teacher, session.teacher_processor, records)
    dtype = next(p.dtype for p in session.policy.parameters() if p.is_floating_point())
    before = session.adapter.calls.load_model(session.config.student.path, "student", dtype).to(session.device)
    rows["before"] = answers_of(session, before, session.student_processor, records)
    del before
    rows["after"] = answers_of(session, session.policy, session.student_processor, records)
    path = Path(out_dir) / "plots" / "answers.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(records, rows).save(path)
    return path


def draw_grid(records: list[dict], rows: dict[str, list[str]]) -> Image.Image:
    """One tile per record: the (first) picture, the question, then `answer` and each row's response,
    marked + when it matches the answer exactly and - when not."""
    font = ImageFont.load_default()
    width, height = THUMB + 2 * 120, THUMB + TEXT_LINES * LINE + 16
    columns = min(COLUMNS, len(records))
    sheet = Image.new("RGB", (columns * width, -(-len(records) // columns) * height), "white")
    pen = ImageDraw.Draw(sheet)
    for i, record in enumerate(records):
        x, y = (i % columns) * width, (i // columns) * height
        sheet.paste(load_rgb(record["images"][0]).resize((THUMB, THUMB), Image.NEAREST), (x + 8, y + 8))
        lines = textwrap.wrap(record["prompt"], 40)[:2]
        answer = record.get("answer") or ""
        lines.append(f"  answer: {answer}")
        for name, responses in rows.items():
            mark = "+" if normalize_answer(responses[i]) == normalize_answer(answer) else "-"
            lines.append(f"{mark} {name}: {responses[i]}")
        for j, line in enumerate(lines[:TEXT_LINES]):
            pen.text((x + 8, y + THUMB + 12 + j * LINE), line, fill="black", font=font)
    return sheet
