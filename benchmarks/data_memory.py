"""Peak memory of loading a parquet set and reading training steps from it, by the set's size.

    python -m benchmarks.data_memory [--rows 10k,1m] [--steps 1000] [--batch 8]

Each size is a generated parquet file of text records ({"prompt": "a+b=", "answer": "c"}). A fresh process
loads it as a run does (`mmopd.data.load_records` with the text adapter's check: every row checked once in a
streaming pass) and reads `--steps` global batches in the training order (`step_indices`); it does so twice
per size: the first run, where `datasets` converts the parquet file to its arrow cache, and a later run that
maps that cache. Columns: the seconds to load and to read; the peak resident memory above the process after
its imports; of what stays resident at the end, the file-backed pages (the memory-mapped arrow file, plus
libraries loaded on first use: page cache, shared, dropped by the kernel under pressure) and the anonymous
memory the process owns; and the ratio of each
to the first (smallest) size measured in the same run. Records stay in the mapped table and only skipped rows
are indexed, so the anonymous memory should stay near flat while the rows grow a hundredfold; the mapped
pages grow with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.measure import MIB, _rss_kib, run_child, table
from mmopd.data import load_records
from mmopd.step_order import step_indices
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


def child(path: str, steps: int, batch: int) -> dict:
    """Load and read in this process; the peak RSS above what the imports took, and what stays resident."""
    before = {field: _rss_kib(field) for field in ("VmRSS", "RssFile", "RssAnon")}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = time.perf_counter()
    data = load_records(path, TextAdapter().check_record, role="data.train")
    loaded = time.perf_counter()
    chars = 0
    for step in range(steps):
        chars += sum(len(data.records[i]["prompt"]) for i in step_indices(len(data), step, batch, seed=0))
    read = time.perf_counter()
    return {"rows": len(data), "load_s": loaded - start, "read_s": read - loaded, "chars": chars,
            "peak_bytes": (_rss_kib("VmHWM") - before["VmRSS"]) * 1024,
            "mapped_bytes": (_rss_kib("RssFile") - before["RssFile"]) * 1024,
            "anon_bytes": (_rss_kib("RssAnon") - before["RssAnon"]) * 1024}


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
    base = {run: got for rows, run, got in results[:len(RUNS)]}
    lines = []
    for rows, run, got in results:
        if "error" in got:
            lines.append([f"{rows:,}", run, "error", got["error"], "", "", "", "", ""])
            continue
        first = base[run]
        lines.append([f"{rows:,}", run, f"{got['load_s']:.1f}", f"{got['read_s']:.1f}",
                      f"{got['peak_bytes'] / MIB:.1f}", _ratio(got, first, "peak_bytes"),
                      f"{got['mapped_bytes'] / MIB:.1f}", f"{got['anon_bytes'] / MIB:.1f}",
                      _ratio(got, first, "anon_bytes")])
    print(f"{args.steps} steps of {args.batch} records from a parquet set (text records)")
    smallest = f"{rows_of(args.rows)[0]:,}"
    print(table(["rows", "run", "load s", f"read {args.steps} steps s", "peak RSS MiB", f"peak vs {smallest}",
                 "end: file-backed MiB", "end: anonymous MiB", f"anonymous vs {smallest}"], lines))


def _ratio(got: dict, first: dict, key: str) -> str:
    return f"{got[key] / first[key]:.2f}x" if first.get(key, 0) > 0 else "n/a"


if __name__ == "__main__":
    main()
