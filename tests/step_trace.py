"""The path of one training step through the project's files, as docs/architecture.md gives it.

`trace_step(out_dir)` trains the text toy (untrained pair, hf engines, `rollout.max_new_tokens=2`,
`train.batch_size=4`) under `sys.setprofile` and records every call into a function of `mmopd/` or `modalities/`
(comprehensions aside) between the 2nd and 3rd calls of the optimizer's `step`. A *move* is a call into another file than the last
recorded call's; a *return* is a move into a file already entered in that step.

    python -m tests.step_trace            # prints the table docs/architecture.md holds
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / part) + "/" for part in ("mmopd", "modalities"))
COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")  # frames of their own, never a move
BEGIN, END = "<!-- step trace: begin (python -m tests.step_trace) -->", "<!-- step trace: end -->"


@dataclass
class Trace:
    calls: list[tuple[str, str]] = field(default_factory=list)  # (file relative to the repo, function), in order

    @property
    def files(self) -> list[str]:
        """Each file the step enters, in the order it first enters it."""
        return list(dict.fromkeys(file for file, _ in self.calls))

    @property
    def functions(self) -> int:
        return len(set(self.calls))

    def moves(self) -> tuple[int, int]:
        """(moves between files, moves back into a file already entered)."""
        moves = returns = 0
        seen: set[str] = set()
        last = None
        for file, _ in self.calls:
            if last is not None and file != last:
                moves += 1
                returns += file in seen
            seen.add(file)
            last = file
        return moves, returns

    def returns_into(self) -> dict[str, int]:
        """Each file's returns: the moves back into it after the step first entered it."""
        counts = dict.fromkeys(self.files, 0)
        seen: set[str] = set()
        last = None
        for file, _ in self.calls:
            if last is not None and file != last and file in seen:
                counts[file] += 1
            seen.add(file)
            last = file
        return counts

    def markdown(self) -> str:
        moves, returns = self.moves()
        per_file: dict[str, list[str]] = {}
        for file, function in self.calls:
            names = per_file.setdefault(file, [])
            if function not in names:
                names.append(function)
        back = self.returns_into()
        rows = [f"| `{file}` | {back[file]} | {', '.join(f'`{name}`' for name in names)} |"
                for file, names in per_file.items()]
        return "\n".join([BEGIN, "",
                          f"{len(self.files)} files, {self.functions} functions, {moves} moves between files, "
                          f"{returns} of them back into a file already entered.", "",
                          "| file (in the order the step first enters it) | returns into it | functions called, in "
                          "first-call order |", "|---|---|---|", *rows, "", END])


def _optimizer_step(frame: FrameType) -> bool:
    code = frame.f_code
    return code.co_name == "step" and "/torch/optim/" in code.co_filename and "lr_scheduler" not in code.co_filename


def trace_step(out_dir: Path) -> Trace:
    from mmopd import load_config, train
    from modalities.text import toy

    pair = toy.build_untrained(out_dir / "toy")
    config = load_config(None, {
        "modality": "text", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
        "data.train": str(pair["train"]), "rollout.max_new_tokens": 2, "train.steps": 4, "train.batch_size": 4,
        "train.eval_every": 0, "train.save_every": 0, "train.out_dir": str(out_dir / "run"),
        "train.progress": False, "train.warmup": 0})
    trace, steps = Trace(), [0]

    def profile(frame: FrameType, event: str, _: Any) -> None:
        if event != "call":
            return
        if _optimizer_step(frame):
            steps[0] += 1
        elif (steps[0] == 2 and frame.f_code.co_filename.startswith(PROJECT)
              and not frame.f_code.co_name.endswith(COMPREHENSIONS)):
            trace.calls.append((str(Path(frame.f_code.co_filename).relative_to(ROOT)), frame.f_code.co_qualname))

    sys.setprofile(profile)
    try:
        train(config)
    finally:
        sys.setprofile(None)
    if steps[0] < 3:
        raise RuntimeError(f"the optimizer stepped {steps[0]} times; the trace needs 3")
    return trace


def documented(path: Path = ROOT / "docs" / "architecture.md") -> str:
    text = path.read_text()
    return text[text.index(BEGIN):text.index(END) + len(END)]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(trace_step(Path(tmp)).markdown())
