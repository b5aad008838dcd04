"""`make demos`: rerun the three full demos and compare each with the README's table, within a stated tolerance.

    python -m tests.demos_check [--out runs/demos] [--tolerance 0.05] [--jobs 2] [--only text,vlm,image] [--spread]

Each demo runs as a user runs it (`python -m mmopd.cli demo MODALITY --out OUT/MODALITY --force
train.progress=false`, on one torch thread, as `mmopd demo` always trains), two at a time by default. The README's
tables are read from README.md: in the section headed by "`mmopd demo MODALITY`", the first number of the rows
"teacher…", "student before…" and "student after…" (accuracy for text and VLM, judge accuracy for the image
demo). Each must lie within the tolerance of the run's summary.json (teacher, student_before, student_after); a
miss fails with a line naming the demo, the row, both numbers and the demo's log. The test suite checks only
that the demos learn (tests/e2e/test_demo_text.py and test_demo_vlm.py at a reduced size, test_image_tokens_demo.py).

--spread measures what another CPU may change instead: each demo as is and under the perturbations that stand in for
another CPU's floats (PERTURBATIONS: a toy built from another seed, another batch order and sampling, training on two
threads), then each number's mean and its largest distance from the mean. It fails where the "after" numbers lie
more than SPREAD from their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ("text", "vlm", "image")
ROWS = {"teacher": "teacher", "student before": "student_before", "student after": "student_after"}
TOLERANCE = 0.05  # absolute, on each accuracy: above the ±0.03 spread a demo may show on another CPU
SPREAD = 0.03  # the most an "after" number of --spread may lie from their mean
# name -> (the command's arguments after `python -m mmopd.cli`, torch threads); OUT is the perturbation's own
# directory, AS_IS the first one's: the training perturbations retrain its toy, only the toy seed builds another
PERTURBATIONS = {
    "as is": (["demo", "{demo}", "--out", "{out}", "--force", "train.progress=false"], 1),
    "toy seed 1": (["demo", "{demo}", "--out", "{out}", "--force", "--seed", "1", "train.progress=false"], 1),
    "train seed 1": (["train", "{as_is}/config.yaml", "train.out_dir={out}/runs/train", "train.seed=1",
                      "train.progress=false"], 1),
    "2 threads": (["train", "{as_is}/config.yaml", "train.out_dir={out}/runs/train", "train.progress=false"], 2),
}


def readme_table(readme: str, demo: str) -> dict[str, float]:
    """{summary key: number} from the first table after the heading that names `mmopd demo <demo>`."""
    lines = readme.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and f"`mmopd demo {demo}`" in line), None)
    if start is None:
        raise ValueError(f"README.md has no heading naming `mmopd demo {demo}`")
    table: dict[str, float] = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        key = next((key for row, key in ROWS.items() if cells and cells[0].startswith(row)), None)
        number = re.search(r"\d+\.\d+", cells[1]) if key and len(cells) > 1 else None
        if number:
            table[key] = float(number.group())
    if set(table) != set(ROWS.values()):
        raise ValueError(f"README.md's `mmopd demo {demo}` table lacks rows {sorted(set(ROWS.values()) - set(table))}")
    return table


def run_demo(demo: str, out: Path, perturbation: str = "as is", as_is: Path | None = None) -> tuple[dict, Path, float]:
    """Run one full demo into out/<demo> (or retrain the toy in `as_is` as `perturbation` says); return its
    summary.json, its log's path and its wall seconds."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{demo}.log"
    args, threads = PERTURBATIONS[perturbation]
    args = [arg.format(demo=demo, out=out / demo, as_is=as_is) for arg in args]
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run([sys.executable, "-m", "mmopd.cli", *args], cwd=ROOT, stdout=handle,
                              stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    if code != 0:
        raise RuntimeError(f"`mmopd {' '.join(args)}` exited with {code}; log {log}")
    summaries = list((out / demo / "runs").glob("*/summary.json"))
    if len(summaries) != 1:
        raise RuntimeError(f"`mmopd {' '.join(args)}` wrote {len(summaries)} summary.json files under "
                           f"{out / demo}/runs")
    return json.loads(summaries[0].read_text()), log, time.perf_counter() - started


def spread_rows(demo: str, runs: dict[str, dict]) -> list[str]:
    """Markdown rows: each perturbation's teacher / before / after, then each number's mean ± its largest distance
    from the mean."""
    rows = [f"| {demo} | {name} | " + " | ".join(f"{run[key]:.3f}" for key in ROWS.values()) + " |"
            for name, run in runs.items()]
    cells = []
    for key in ROWS.values():
        values = [run[key] for run in runs.values()]
        mean = sum(values) / len(values)
        cells.append(f"{mean:.3f} ± {max(abs(v - mean) for v in values):.3f}")
    return [*rows, f"| {demo} | **mean ± largest distance** | " + " | ".join(cells) + " |"]


def spread(demos: list[str], out: Path, jobs: int) -> int:
    """Each demo as is and under every perturbation; a table of them all; 1 where an after spreads beyond SPREAD."""
    def perturbed(demo: str) -> dict[str, dict]:
        as_is = out / "as-is"
        runs = {"as is": run_demo(demo, as_is)[0]}
        for name in list(PERTURBATIONS)[1:]:
            runs[name] = run_demo(demo, out / name.replace(" ", "-"), name, as_is / demo)[0]
        return runs

    with ThreadPoolExecutor(jobs) as pool:
        results = dict(zip(demos, pool.map(perturbed, demos)))
    print("| demo | perturbation | teacher | student before | student after |\n|---|---|---|---|---|")
    failures = []
    for demo, runs in results.items():
        print("\n".join(spread_rows(demo, runs)))
        after = [run["student_after"] for run in runs.values()]
        mean = sum(after) / len(after)
        if max(abs(value - mean) for value in after) > SPREAD:
            failures.append(f"demo {demo}: student_after {', '.join(f'{v:.3f}' for v in after)} lie more than "
                            f"±{SPREAD} from their mean {mean:.3f}")
    if failures:
        print("\n".join(["the demos spread beyond the stated spread:", *failures]), file=sys.stderr)
        return 1
    return 0


def misses(demo: str, expected: dict[str, float], summary: dict, tolerance: float) -> list[str]:
    """One line per README number the run missed by more than `tolerance`."""
    return [f"demo {demo}: {key} {summary[key]:.3f}, README {value:.3f} (off by {abs(summary[key] - value):.3f} "
            f"> {tolerance})" for key, value in expected.items() if abs(summary[key] - value) > tolerance]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demos", help="where the demos run")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="absolute, on each accuracy")
    parser.add_argument("--jobs", type=int, default=2, help="demos run at once (each on one thread)")
    parser.add_argument("--only", default=",".join(DEMOS), help="a comma-separated subset of text,vlm,image")
    parser.add_argument("--spread", action="store_true", help="rerun each demo under the perturbations that stand in "
                        "for another CPU and print the spread (compares nothing with the README)")
    args = parser.parse_args(argv)
    demos = args.only.split(",")
    if not set(demos) <= set(DEMOS):
        parser.error(f"--only takes {', '.join(DEMOS)}; got {args.only}")
    if args.spread:
        return spread(demos, args.out, args.jobs)
    readme = (ROOT / "README.md").read_text()
    expected = {demo: readme_table(readme, demo) for demo in demos}
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(demos, pool.map(lambda demo: run_demo(demo, args.out), demos)))
    failures = []
    for demo, (summary, log, seconds) in results.items():
        row = " / ".join(f"{summary[key]:.3f} (README {expected[demo][key]:.3f})" for key in ROWS.values())
        print(f"demo {demo}: teacher / before / after = {row}, {seconds:.0f} s")
        failures += [f"{line}; log {log}" for line in misses(demo, expected[demo], summary, args.tolerance)]
    if failures:
        print("\n".join(["the demos do not match README.md within the tolerance:", *failures]), file=sys.stderr)
        return 1
    print(f"all {len(demos)} demos match README.md within ±{args.tolerance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
