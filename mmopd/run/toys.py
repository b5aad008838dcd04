"""Each modality's toy task and end-of-run report, found by name through entry points.

A toy (`mmopd.toys` group) is `build(out_dir, family, progress, seed) -> config path`: synthetic data, a
trained teacher and a weak student, all drawn from `seed`, saved with `save_pretrained`, and a ready config. A
report (`mmopd.reports` group) is `write(out_dir, session, summary)`: what a modality shows a person at the end of
a run (answer grids, sample pictures). Neither is model I/O, so neither is part of the ModalityAdapter.

A toy builds on one thread whatever the caller's thread count: CPU kernels split reductions per thread, so
two threads train a slightly different teacher than one, and the demos' numbers would depend on the machine.
"""

from __future__ import annotations

from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mmopd.config import ConfigError


def _entry(group: str, name: str) -> Callable[..., Any] | None:
    return next((ep.load() for ep in entry_points(group=group) if ep.name == name), None)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread inside, the caller's count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_toy(modality: str, out_dir: Path, family: str | None, progress: bool = True, seed: int = 0) -> Path:
    """Build `modality`'s toy task in out_dir (on one thread, from `seed`) and return the path of its config."""
    build = _entry("mmopd.toys", modality)
    if build is None:
        names = sorted(ep.name for ep in entry_points(group="mmopd.toys"))
        raise ConfigError(f"modality {modality!r} has no toy task; available: {', '.join(names) or 'none'}")
    with one_thread():
        return build(Path(out_dir), family, progress, seed)


def write_report(modality: str, out_dir: Path, session: Any, summary: dict[str, Any]) -> None:
    """The modality's end-of-run artefacts, where it has a report (text has none)."""
    write = _entry("mmopd.reports", modality)
    if write is not None:
        write(Path(out_dir), session, summary)
