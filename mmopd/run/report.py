"""What a run leaves for people: metrics.jsonl (appended and flushed per step), the progress bar or log lines,
PNG plots, summary.json, the modality's report and the before/after table."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from mmopd.models.checkpoint import complete_checkpoints
from mmopd.run.toys import write_report
from mmopd.step.health import HealthMonitor

log = logging.getLogger("mmopd")


class MetricsError(RuntimeError):
    """A metrics row that could not be appended (a full disk); the file and the previous checkpoint are intact."""


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash leaves a parseable file. Rows a rerun logs again
    are moved to `metrics.superseded.jsonl` beside it, never deleted."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.superseded = self.path.with_name("metrics.superseded.jsonl")

    def write(self, row: dict[str, Any]) -> None:
        """Append the row's line whole or not at all: a write or fsync that fails (a full disk) cuts the file back
        to its rows before, so no torn line is left and the rerun, resuming from the last checkpoint, logs it again."""
        data = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                previous = complete_checkpoints(self.path.parent)
                kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no checkpoint exists yet"
                raise MetricsError(f"could not append step {row.get('step')}'s row to {self.path} "
                                   f"({err.strerror or err}); the file keeps its whole rows and {kept}. Free space "
                                   "on train.out_dir, then rerun the same command to resume") from err
        finally:
            os.close(fd)

    def supersede_after(self, step: int) -> None:
        """Move the lines logged after `step` (all of them for -1: a restart from step 0), which this segment logs
        again, to the superseded file (appended), and a torn line with them; keep the rest in place. A write that
        fails (a full disk) leaves both files as they were, so the next start moves the lines once."""
        if not self.path.is_file():
            return
        kept, moved = [], []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            row = _parsed(line)
            (kept if row is not None and row.get("step", 0) <= step else moved).append(line.rstrip("\n") + "\n")
        tmp, end = self.path.with_suffix(".tmp"), self.superseded.stat().st_size if self.superseded.is_file() else None
        try:
            if moved:
                _write(self.superseded, moved, "a")
            _write(tmp, kept, "w")
            os.replace(tmp, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the rows appended so far go: the next start appends them again
                if end is None:
                    self.superseded.unlink(missing_ok=True)
                else:
                    os.truncate(self.superseded, end)
            raise MetricsError(f"could not move the rows this run logs again from {self.path} to {self.superseded} "
                               f"({err.strerror or err}); both files are as they were. Free space on train.out_dir, "
                               "then rerun the same command") from err


def _parsed(line: str) -> dict[str, Any] | None:
    """A metrics line's row, or None for a torn or foreign line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _write(path: Path, lines: list[str], mode: str) -> None:
    with path.open(mode, encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


class Progress:
    """Each step as people see it: the samples' health check, the metrics.jsonl row (every `log_every` steps, and
    to the trackers), and on a terminal the progress bar, off one (with train.progress) a log line every ~5%."""

    def __init__(self, metrics: MetricsLog, health: HealthMonitor, steps: int, first: int, log_every: int,
                 main: bool, live: bool, progress: bool, tracker: Callable[..., None] | None):
        self.metrics, self.health, self.steps, self.log_every = metrics, health, steps, log_every
        self.main, self.tracker = main, tracker
        self.bar = tqdm(total=steps, initial=first, desc="distil", disable=not (main and live))
        self.plain_every = max(1, steps // 20) if main and progress and not live else 0

    def step(self, row: dict[str, Any]) -> None:
        done = row["step"]
        if self.main:
            self.health.check(done, row)
        if self.main and done % self.log_every == 0:
            self.metrics.write(row)
            if self.tracker is not None:
                self.tracker({k: v for k, v in row.items() if isinstance(v, float)}, step=done)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", div=f"{row['divergence'] or 0:.3f}",
                             tok_s=f"{row['tokens_per_s']:.0f}")
        if self.plain_every and (done % self.plain_every == 0 or done == self.steps):
            log.info("step %d/%d loss %.4f divergence %.4f tokens/s %.0f", done, self.steps, row["loss"],
                     row["divergence"] or 0.0, row["tokens_per_s"])

    def close(self) -> None:
        self.bar.close()


def eval_row(step: int, metric: str, score: float, kl: dict[str, float] | None) -> dict[str, Any]:
    """An eval's metrics.jsonl row: the student's `eval/<metric>` and its KLs, eval/reverse_kl and eval/forward_kl
    (none when not measured)."""
    return {"step": step, f"eval/{metric}": score, **{f"eval/{name}": value for name, value in (kl or {}).items()}}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete row of a metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


TEACHER_KEY = "divergence/"  # several teachers: divergence/<name>, each teacher's rows' divergence
LAST = 10


def teacher_divergences(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each teacher's divergence, the mean of its last LAST logged values."""
    names = sorted({k[len(TEACHER_KEY):] for r in rows for k in r if k.startswith(TEACHER_KEY)})
    values = {name: [r[TEACHER_KEY + name] for r in rows if _finite(r.get(TEACHER_KEY + name))][-LAST:]
              for name in names}
    return {name: sum(v) / len(v) for name, v in values.items() if v}


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """summary.json, written whole or not at all (a temp file, fsynced and renamed)."""
    path = Path(out_dir) / "summary.json"
    _write(path.with_suffix(".tmp"), [json.dumps(summary, indent=2) + "\n"], "w")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def add_final_eval(summary: dict[str, Any], final: dict[str, Any], kl: dict[str, float] | None,
                   records: list[dict[str, Any]]) -> None:
    """The student's eval after training into `summary`: its score, KLs, 8 samples and the teacher-student gap
    it closed."""
    summary["student_after"] = final["metrics"][summary["metric"]]
    if kl is not None:
        summary["kl_after"] = kl
    summary["samples"] = [{"prompt": r.get("prompt"), "response": resp, "answer": r.get("answer")}
                          for r, resp in zip(records[:8], final["responses"][:8]) if isinstance(resp, str)]
    teacher, before = summary.get("teacher"), summary.get("student_before")
    if teacher is not None and before is not None and teacher > before:
        summary["gap_closed"] = (summary["student_after"] - before) / (teacher - before)


def finish(out: Path, summary: dict[str, Any], session: Any, skipped_steps: int, main: bool,
           every_rank: bool) -> dict[str, Any]:
    """The end of a run that did all its steps: each teacher's divergence and what the run skipped into `summary`,
    then summary.json, the plots, the modality's report and the table. `every_rank`: the report samples sharded
    models, whose forwards need every rank (each writes the same report; rank 0's is kept)."""
    if session.teachers:
        summary["divergence_by_teacher"] = teacher_divergences(read_metrics(out / "metrics.jsonl"))
    summary.update(objective=session.config.objective.kind, skipped_records=session.train_data.skipped,
                   skipped_steps=skipped_steps, out_dir=str(out))
    if main:
        write_summary(out, summary)
        plot_metrics(out, summary["metric"], summary.get("teacher"))
    if main or every_rank:
        with tempfile.TemporaryDirectory() as scratch:
            write_report(session.config.modality, out if main else Path(scratch), session, summary)
    if main:
        print(format_table(summary))
    return summary


def plot_metrics(out_dir: str | Path, metric: str, teacher_score: float | None = None) -> list[Path]:
    """plots/train.png (loss and divergence against step) and plots/eval.png (the eval metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = read_metrics(out_dir / "metrics.jsonl")
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = []

    train = [r for r in rows if "loss" in r]
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("loss", "divergence", *sorted({k for r in train for k in r if k.startswith(TEACHER_KEY)})):
            pts = [(r["step"], r[key]) for r in train if _finite(r.get(key))]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats per response token")
        ax.set_title("training loss and student-teacher divergence")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots / "train.png", dpi=120)
        plt.close(fig)
        written.append(plots / "train.png")

    evals = [(r["step"], r[f"eval/{metric}"]) for r in rows if _finite(r.get(f"eval/{metric}"))]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*evals), marker="o", label="student")
        if teacher_score is not None:
            ax.axhline(teacher_score, color="black", linestyle="--", label="teacher")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"eval {metric}")
        ax.set_title(f"student eval {metric} during distillation")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots / "eval.png", dpi=120)
        plt.close(fig)
        written.append(plots / "eval.png")
    return written


def format_table(summary: dict[str, Any]) -> str:
    """The before/after table printed at the end of a run."""
    metric = summary["metric"]
    rows = [("teacher", summary.get("teacher")), ("teacher, privileged prompts", summary.get("teacher_privileged")),
            ("student before", summary.get("student_before")),
            ("student after", summary.get("student_after"))]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model':<{width}}  {metric}", f"{'-' * width}  {'-' * max(len(metric), 8)}"]
    for name, value in rows:
        if value is not None:
            lines.append(f"{name:<{width}}  {value:.3f}")
    by_teacher = summary.get("divergence_by_teacher")
    if by_teacher:
        lines.append(f"divergence by teacher (mean of the last {LAST} steps): " +
                     ", ".join(f"{name} {value:.4f}" for name, value in by_teacher.items()))
    gap = summary.get("gap_closed")
    if gap is not None:
        lines.append(f"gap closed: {100 * gap:.0f}% of the teacher-student gap")
    lines.extend(_kl_lines(summary.get("kl_before"), summary.get("kl_after")))
    for warning in summary.get("health_warnings") or []:
        lines.append(f"sample health warning ({warning['kind']}): {warning['message']}")
    return "\n".join(lines)


KL_ROWS = (("reverse_kl", "reverse KL, student's samples"), ("forward_kl", "forward KL, teacher's samples"))


def _kl_lines(before: dict[str, float] | None, after: dict[str, float] | None) -> list[str]:
    """The student's per-token KL to the teacher on held-out prompts, before and after, as table rows."""
    if not before and not after:
        return []
    header = "KL to the teacher (nats/token)"
    width = max(len(header), *(len(label) for _, label in KL_ROWS))
    lines = [f"{header:<{width}}  {'before':>8}  {'after':>8}"]
    for key, label in KL_ROWS:
        cells = [f"{d[key]:8.3f}" if d and key in d else f"{'-':>8}" for d in (before, after)]
        lines.append(f"{label:<{width}}  {'  '.join(cells)}")
    return lines


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
