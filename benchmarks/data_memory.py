"""Memory of loading a parquet set and reading training steps from it, by the set's size: what the process owns
apart from the file pages it maps.

    python -m benchmarks.data_memory [--rows 10k,1m] [--steps 1000] [--batch 8] [--json PATH]

Each size is a generated parquet file of text records ({"prompt": "a+b=", "answer": "c"}). A fresh process
loads it as a run does (`mmopd.data.records.load_records` with the text adapter's check: every row checked once in a
streaming pass) and reads `--steps` global batches in the training order (`step_indices`); it does so twice
per size: the first run, where `datasets` converts the parquet file to its arrow cache, and a later run that
maps that cache. Memory is above the process after its imports:
- peak RSS (VmHWM): every resident page, the memory-mapped arrow file's included;
- owned: the anonymous resident memory (RssAnon: heaps, allocator arenas, arrays), what the process holds for
  itself. Its peak is sampled every millisecond in a thread (the kernel keeps no peak of it). USS would not do:
  it counts a mapped file's pages as private while no other process maps that file;
- file-backed (RssFile) at the end: the mapped arrow file and libraries loaded on first use, page cache that
  is shared and that the kernel drops under pressure.
Ratios are to the first (smallest) size, the same run kind. Records stay in the mapped table, only skipped rows
are indexed and the step order is computed, so owned memory should stay flat while the rows grow a hundredfold;
the mapped pages grow with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.measure import MIB, _rss_kib, run_child, table
from mmopd.data.records import load_records
from mmopd.data.step_order import step_indices
from modalities.text.adapter import TextAdapter


def write_set(path: Path, rows: int, chunk: int = 100_000) -> Path:
    """`rows` text records as parquet, written in chunks so the parent never holds the whole set."""
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            ids = range(start, min(rows, start + chunk))
            writer.write_table(pa.table({"prompt": [f"{i % 997}+{i % 991}=" for i in ids],
                                         "answer": [str(i % 997 + i % 991) for i in ids]}, schema=schema))
    return path


class OwnedPeak:
    """The most anonymous resident memory (KiB) seen while in the block, sampled every `every` seconds."""

    def __init__(self, every: float = 0.001):
        self.every, self.kib, self.done = every, _rss_kib("RssAnon"), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.done.wait(self.every):
            self.kib = max(self.kib, _rss_kib("RssAnon"))

    def __enter__(self) -> OwnedPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.kib = max(self.kib, _rss_kib("RssAnon"))


def child(path: str, steps: int, batch: int) -> dict:
    """Load and read in this process; the peaks above what the imports took, and what stays resident."""
    before = {field: _rss_kib(field) for field in ("VmRSS", "RssFile", "RssAnon")}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    with OwnedPeak() as owned:
        start = time.perf_counter()
        data = load_records(path, TextAdapter().check_record, role="data.train")
        loaded = time.perf_counter()
        chars = 0
        for step in range(steps):
            chars += sum(len(data.records[i]["prompt"]) for i in step_indices(len(data), step, batch, seed=0))
        read = time.perf_counter()
    return {"rows": len(data), "load_s": loaded - start, "read_s": read - loaded, "chars": chars,
            "peak_bytes": (_rss_kib("VmHWM") - before["VmRSS"]) * 1024,
            "owned_peak_bytes": (owned.kib - before["RssAnon"]) * 1024,
            "owned_bytes": (_rss_kib("RssAnon") - before["RssAnon"]) * 1024,
            "mapped_bytes": (_rss_kib("RssFile") - before["RssFile"]) * 1024}


RUNS = ("first", "cached")  # the run that converts the parquet file to the arrow cache, and one after it


def rows_of(text: str) -> list[int]:
    """'10k,1m' -> [10000, 1000000]."""
    scale = {"k": 1_000, "m": 1_000_000}
    return [int(float(p[:-1]) * scale[p[-1]]) if p[-1] in scale else int(p) for p in text.lower().split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10k,1m")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--child", default="", help="(internal) measure this parquet file in this process")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "cache")  # the children's arrow caches, removed after
        for rows in rows_of(args.rows):
            path = write_set(Path(tmp) / f"set-{rows}.parquet", rows)
            for run in RUNS:
                results.append((rows, run, run_child("benchmarks.data_memory", [
                    "--child", str(path), "--steps", str(args.steps), "--batch", str(args.batch)])))
    if args.json:
        Path(args.json).write_text(json.dumps([{"rows": rows, "run": run, **got} for rows, run, got in results],
                                              indent=1) + "\n")
    base = {run: got for rows, run, got in results[:len(RUNS)]}
    lines = []
    for rows, run, got in results:
        if "error" in got:
            lines.append([f"{rows:,}", run, "error", got["error"], *[""] * 7])
            continue
        first = base[run]
        lines.append([f"{rows:,}", run, f"{got['load_s']:.1f}", f"{got['read_s']:.1f}",
                      *[cell for key in ("peak_bytes", "owned_peak_bytes", "owned_bytes")
                        for cell in (f"{got[key] / MIB:.1f}", _ratio(got, first, key))],
                      f"{got['mapped_bytes'] / MIB:.1f}"])
    print(f"{args.steps} steps of {args.batch} records from a parquet set (text records)")
    smallest = f"{rows_of(args.rows)[0]:,}"
    print(table(["rows", "run", "load s", f"read {args.steps} steps s", "peak RSS MiB", f"peak RSS vs {smallest}",
                 "peak owned MiB", f"peak owned vs {smallest}", "end owned MiB", f"end owned vs {smallest}",
                 "end file-backed MiB"], lines))


def _ratio(got: dict, first: dict, key: str) -> str:
    return f"{got[key] / first[key]:.2f}x" if first.get(key, 0) > 0 else "n/a"


if __name__ == "__main__":
    main()
