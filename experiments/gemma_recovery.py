"""How best to recover a depth-pruned Gemma 3 270M? On-policy distillation against its unpruned teacher, beside
supervised KD, SFT on the teacher's samples, healing first, and GKD.

    python -m experiments.gemma_recovery --teacher DIR --student DIR [--out DIR] [--methods opd,skd_opd]
        [--steps N] [--seeds 0,1,2] [--publish]

Prompts: the first 10 words of Python standard-library docstrings (train and held-out modules differ) and a
few-shot task with checkable answers (single-digit addition, capital cities), whose train and eval splits share no
pair and no country. Each method runs `steps` optimizer steps of `batch` prompts and `new` new tokens, with the
fused loss over the full 262k vocabulary. Measured on held-out prompts before and after: the reverse KL on the
student's own samples, the forward KL on the teacher's samples (coverage), the share of repeated 3-grams in the
student's samples, and the task accuracy (greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import mmopd  # noqa: E402
from experiments.text_task import save_results, step_flops  # noqa: E402
from mmopd.run.report import read_metrics  # noqa: E402
from modalities.text.heldout import docstring_task_data, measure  # noqa: E402

NAME = "gemma_recovery"
PARAMS = {"student": 207e6, "teacher": 268e6}  # the tied head (168M) counted once: 2·N FLOPs a token
COLUMNS = (("reverse KL", "reverse_kl"), ("forward KL", "forward_kl"), ("token entropy", "health/token_entropy"),
           ("repeated 3-grams", "health/repeat_share"), ("task accuracy", "task_accuracy"))

# each method: a list of stages (config overrides), run one after the other on the same student
METHODS: dict[str, list[list[str]]] = {
    "opd": [["objective.kind=on_policy", "objective.divergence=reverse_kl"]],
    "supervised_kd": [["objective.kind=supervised_kd", "objective.divergence=forward_kl"]],
    "seq_kd": [["objective.kind=sft"]],  # the NLL of the teacher's samples, stored as the records' answers
    "seqkd_opd": [["objective.kind=sft"], ["objective.kind=on_policy", "objective.divergence=reverse_kl"]],
    "skd_opd": [["objective.kind=supervised_kd", "objective.divergence=forward_kl"],
                ["objective.kind=on_policy", "objective.divergence=reverse_kl"]],
    "gkd": [["objective.kind=gkd", "objective.lmbda=0.5", "objective.divergence=reverse_kl"]],
    # healing, then OPD that keeps the teacher's samples' NLL beside the reverse KL at every step
    "skd_opd_sft": [["objective.kind=supervised_kd", "objective.divergence=forward_kl"],
                    ["objective.kind=on_policy", "objective.divergence=reverse_kl", "objective.sft_weight=1.0"]],
}


def load(path: str | Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_data(out: Path, teacher_dir: str, train_prompts: int, new: int) -> dict[str, Any]:
    """Train records (docstring and task prompts, each with a teacher sample as its answer) and the held-out sets;
    cached in `out`."""
    cache = out / "data.json"
    if cache.exists():
        return json.loads(cache.read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    data = docstring_task_data(load(teacher_dir), tokenizer, train_prompts, 16, new)
    cache.write_text(json.dumps(data))
    return data


def measure_dir(student_dir: str | Path, teacher: transformers.PreTrainedModel, tokenizer: Any, data: dict,
                new: int) -> dict[str, Any]:
    return measure(load(student_dir), teacher, tokenizer, data["held_out"], data["held_out_teacher"], data["task"],
                   new)


def run_method(method: str, seed: int, args: argparse.Namespace, data_file: Path) -> Path:
    """Run a method's stages on the pruned student; return the final model's folder."""
    student = args.student
    stages = METHODS[method]
    for i, overrides in enumerate(stages):
        out = Path(args.out) / f"{method}-s{seed}" / f"stage{i}"
        config = mmopd.load_config(None, [
            "modality=text", f"student.path={student}", f"teacher.path={args.teacher}", f"data.train={data_file}",
            f"train.out_dir={out}", f"rollout.max_new_tokens={args.new}", f"train.steps={args.steps // len(stages)}",
            f"train.batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup=2", f"train.seed={seed}",
            "train.eval_every=0", "train.save_every=8", "train.keep_last=1", "objective.fused=always",
            *overrides])
        summary = mmopd.train(config)
        if "stopped_by" in summary:  # a signal stopped it at a checkpoint: rerun the command to resume
            raise SystemExit(f"{method} stopped by {summary['stopped_by']} at step {summary['steps']}; rerun to resume")
        student = str(max((out / "checkpoints").glob("step-*"), key=lambda d: int(d.name[5:])) / "model")
    return Path(student)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", default="runs/gemma_recovery")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--publish", action="store_true", help="also copy the table, results and plot to docs/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, args.teacher, args.train_prompts, args.new)
    data_file = write_jsonl(out / "train.jsonl", data["train"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.teacher)
    teacher = load(args.teacher)
    results_file = out / "results.jsonl"
    done = {(r["method"], r["seed"]) for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.exists() else set()
    for name, folder in (("teacher", args.teacher), ("pruned", args.student)):  # the two ends, for reference
        if (name, 0) not in done:
            row = {"method": name, "seed": 0, **measure_dir(folder, teacher, tokenizer, data, args.new)}
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            if (method, seed) in done:
                continue
            started = time.time()
            final = run_method(method, seed, args, data_file)
            row = {"method": method, "seed": seed, "train_s": time.time() - started,
                   "health_warnings": run_warnings(out / f"{method}-s{seed}"),
                   **measure_dir(final, teacher, tokenizer, data, args.new)}
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    prompt_tokens = statistics.fmean(len(tokenizer(r["prompt"]).input_ids) for r in data["train"])
    report(out, [json.loads(line) for line in results_file.read_text().splitlines()],
           Path(__file__).resolve().parents[1] if args.publish else None, prompt_tokens, args.batch)


def run_warnings(run: Path) -> list[str]:
    """The sample-health warnings of a method's stages (each stage's summary.json), in order."""
    return [w for stage in sorted(run.glob("stage*"))
            for w in json.loads((stage / "summary.json").read_text()).get("health_warnings", [])]


def run_flops(run: Path, prompt_tokens: float, batch: int) -> float | None:
    """A method run's training FLOPs (experiments.text_task.step_flops: 2·N a token forward, 4·N backward, the
    student's rollout where the step was on-policy, the teacher's scoring), from its stages' metrics; None where
    the run is not kept in --out."""
    stages = sorted(run.glob("stage*"))
    if not stages:
        return None
    task = {"params": PARAMS, "prompt_tokens": prompt_tokens}
    total = 0.0
    for stage in stages:
        config = mmopd.load_config(stage / "config.yaml")
        full = batch * config.rollout.max_new_tokens  # a step that logs no response tokens: whole answers
        total += sum(step_flops({"response_tokens": full, **r}, config.objective.kind, task, batch)
                     for r in read_metrics(stage / "metrics.jsonl") if "loss" in r)
    return total


def _warned(rows: list[dict]) -> str:
    """How many of the runs that recorded their warnings warned ("–" where none did: rows from before they were)."""
    known = [r for r in rows if "health_warnings" in r]
    return f"{sum(bool(r['health_warnings']) for r in known)} of {len(known)}" if known else "–"


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def report(out: Path, rows: list[dict], root: Path | None, prompt_tokens: float, batch: int) -> None:
    """A table (mean ± sd over seeds), one sample of each method, and a plot: the two KLs per method, and the
    token entropy of the student's samples per step through each method's stages."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    lines = ["| method | seeds | " + " | ".join(c for c, _ in COLUMNS)
             + " | training PFLOPs | runs that warned | a held-out sample (seed 0) |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    for m in methods:
        cells = [_cell([r[key] for r in by_method[m]]) for _, key in COLUMNS]
        flops = [f for run in out.glob(f"{m}-s*") if (f := run_flops(run, prompt_tokens, batch)) is not None]
        runs = f"{len(flops)} run{'s' if len(flops) > 1 else ''}"
        cells.append(f"{_cell([f / 1e15 for f in flops])} ({runs})" if flops else "–")
        first = by_method[m][0]["samples"][0].replace("\n", "⏎").replace("|", "\\|")
        lines.append(f"| {m} | {len(by_method[m])} | " + " | ".join(cells)
                     + f" | {_warned(by_method[m])} | `{first[:60]}` |")
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.38
    for i, (label, key) in enumerate(COLUMNS[:2]):
        values = [[r[key] for r in by_method[m]] for m in methods]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        bars.bar([j + (i - 0.5) * width for j in range(len(methods))], list(map(statistics.fmean, values)), width,
                 yerr=spread, capsize=3, label=label)
    bars.set_xticks(range(len(methods)), methods, fontsize=8)
    bars.set_ylabel("nats per token, held-out prompts")
    bars.set_title("reverse KL (student's samples) and forward KL (teacher's); bars ± sd over seeds", fontsize=10)
    bars.legend(fontsize=8)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for m in methods:
        for run in sorted(out.glob(f"{m}-s*"), key=lambda d: int(d.name.rsplit("-s", 1)[1])):
            points, offset = [], 0
            for stage in sorted(run.glob("stage*")):
                metrics = [r for r in read_metrics(stage / "metrics.jsonl") if "loss" in r]
                points += [(offset + r["step"], r["health/token_entropy"])
                           for r in metrics if "health/token_entropy" in r]
                offset += len(metrics)
            if points:
                seed = run.name.rsplit("-", 1)[1]
                curves.plot(*zip(*points), "o-", ms=2, lw=1, color=colours[m], label=f"{m} {seed}")
    curves.set_xlabel("step")
    curves.set_title("token entropy of the student's samples per step (nats; the runs kept in --out)", fontsize=10)
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"results_{NAME}.png", dpi=110)
    save_results(out, NAME, {"rows": rows}, "\n".join(lines) + "\n", root)


if __name__ == "__main__":
    main()
