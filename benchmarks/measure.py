"""Time and peak memory of one callable, the same way for every benchmark, and the table they print.

Time: the median wall-clock seconds of `reps` calls after one warm-up call (CUDA is synchronised around
each call).

Peak memory, "extra over the inputs":
- CUDA: torch.cuda.max_memory_allocated() during one call, minus the memory allocated before it.
- CPU: the process's peak resident set (VmHWM in /proc/self/status) during one call, minus its resident
  set before it; the peak is reset first by writing 5 to /proc/self/clear_refs (Linux). This counts every
  page the call touched (allocator caches included), so it is an upper bound on what the tensors need.
  Benchmarks run each case in a fresh process, so one case's freed-but-cached memory does not hide
  another's peak.
"""

from __future__ import annotations

import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

GIB = 2**30
MIB = 2**20


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine(device: torch.device) -> str:
    """One line that names the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = len(__import__("os").sched_getaffinity(0))
    return (f"CPU {platform.processor() or platform.machine()} ({cores} cores available, "
            f"{torch.get_num_threads()} torch threads), no GPU, torch {torch.__version__}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds per call of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Extra peak memory of one call of fn over what was allocated before it (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def rank_memory(device: torch.device, peak: bool = False) -> int:
    """Bytes this process holds now (or at its peak since `reset_peak`): allocated on CUDA, resident on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    return _rss_kib("VmHWM" if peak else "VmRSS") * 1024


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set


def run_child(module: str, args: list[str], timeout: float = 600) -> dict:
    """Run `python -m module args` (one benchmark case) in a fresh process and return the JSON it prints last."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        return {"error": failure_line(out.stderr, out.returncode)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def failure_line(stderr: str, returncode: int) -> str:
    """What a failed child says went wrong: its last exception line (a torchrun'd rank's comes before torchrun's
    own ChildFailedError summary, between rules of `=` and `-`), else its last line, else its exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip().strip("=-")]
    raised = [line for line in lines if re.search(r"(^|\s)[\w.]*(Error|Exception):", line)
              and "ChildFailedError" not in line]
    return (raised or lines or [f"exit code {returncode}"])[-1]


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table, columns padded for reading in a terminal too."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sizes(text: str) -> list[int]:
    """'256,1k,8k' -> [256, 1024, 8192]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out
