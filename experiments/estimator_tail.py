"""Top-k + tail against the exact teacher, on the text, VLM and image-token toys.

    python -m experiments estimator_tail [--out DIR] [--size tiny|full] [--publish]

What a served teacher gives for `estimator: full` is its top K log-probs per position, with the rest of its mass
as one tail class (`mmopd/losses/tail.py`). This runs that signal in-process (`teacher.top_k: K`, `teacher.tail:
true`: the hf teacher hands over exactly those K + 1 classes, which the served tests show equal the served
teacher's) against the exact teacher (`on_policy_full`, all V logits), from each toy's student start, with each
toy's on_policy budget and settings (compute_matched's: text 200 steps of 64 prompts, VLM 500, image 200), 3
seeds. The exact runs are compute_matched's own (reused when --out is shared). Top-K without a tail, renormalised
over the K ids, is the estimator experiment's `on_policy_top4` on the text toy (the same runs but for the tail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.compute_matched import METHODS, MODALITIES, seed_runs  # noqa: E402
from experiments.compute_matched import NAME as MATCHED  # noqa: E402
from experiments.modality_task import build_modality_task  # noqa: E402
from experiments.text_task import SIZES, base_overrides, build_task, mean_std, save_results  # noqa: E402

NAME = "estimator_tail"
K = 4
TAIL = f"on_policy_top{K}_tail"
TAIL_OVERRIDES = {"objective.kind": "on_policy", "objective.estimator": "full", "teacher.top_k": K,
                  "teacher.tail": True}
TOYS = ("text", "image", "vlm")  # the slowest last
METHODS_HERE = {"on_policy_full": METHODS["on_policy_full"][0], TAIL: TAIL_OVERRIDES}
LABELS = {"on_policy_full": "exact teacher (all V logits)", TAIL: f"top-{K} + tail class (a served teacher's)"}


def toy_setup(out: Path, size: str, toy: str) -> tuple[dict[str, Any], dict[str, Any], Path, int]:
    """A toy's task (built once), its base settings, compute_matched's run folder and the on_policy budget."""
    if toy == "text":
        task = build_task(out, size)
        return task, base_overrides(task, size), out / "runs", \
            max(int(METHODS["on_policy_full"][1] * SIZES[size]["scale"]), 2)
    task = build_modality_task(out / f"{toy}_toy", size, toy)
    base = {**task["base"], "train.save_every": 0}
    if size == "tiny":
        base = {**base, "data.eval_limit": 6, "train.batch_size": 4}
    return task, base, out / f"{MATCHED}_{toy}" / "runs", MODALITIES[toy]["budget_steps"] if size == "full" else 2


def toy_runs(out: Path, size: str, toy: str, seeds: tuple[int, ...]
             ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The exact and the top-K + tail runs of one toy, for these seeds (trained, or reused where finished)."""
    task, base, runs, steps = toy_setup(out, size, toy)
    return task, seed_runs(runs, seeds, METHODS_HERE, {name: steps for name in METHODS_HERE}, base, task)


def finished_seeds(out: Path, size: str, toy: str) -> tuple[int, ...]:
    """The seeds whose runs of every method on this toy have finished."""
    if toy != "text" and not (out / f"{toy}_toy" / "task.json").exists():
        return ()
    runs = out / "runs" if toy == "text" else out / f"{MATCHED}_{toy}" / "runs"
    return tuple(seed for seed in SIZES[size]["seeds"]
                 if all((runs / name / f"seed{seed}" / "summary.json").exists() for name in METHODS_HERE))


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Run (or reuse) one seed on every toy before the next; after each toy's run, write results_estimator_tail.png,
    .json and .md over the runs finished so far (a cut-short experiment still reports whole seeds per toy)."""
    for seed in SIZES[size]["seeds"]:
        for toy in TOYS:
            toy_runs(out, size, toy, (seed,))
            result = results(out, size)
            plot(result, out / f"results_{NAME}.png")
            save_results(out, NAME, result, table(result), root)
    return result


def results(out: Path, size: str) -> dict[str, Any]:
    """Per toy with finished runs: the final and best metric and teacher seconds per step, per method."""
    toys = {}
    for toy in TOYS:
        seeds = finished_seeds(out, size, toy)
        if not seeds:
            continue
        task, curves = toy_runs(out, size, toy, seeds)
        toys[toy] = {"metric": task.get("metric", "accuracy"), "teacher": curves["on_policy_full"][0]["teacher"],
                     "student_before": curves["on_policy_full"][0]["student_before"],
                     "steps": curves["on_policy_full"][0]["steps"][-1], "seeds": list(seeds),
                     "methods": {name: {"accuracy_final": [c["accuracy"][-1] for c in cs],
                                        "accuracy_best": [max(c["accuracy"]) for c in cs],
                                        "teacher_seconds_per_step": [c["teacher_seconds_per_step"] for c in cs]}
                                 for name, cs in curves.items()},
                     "curves": curves}
    return {"top_k": K, "toys": toys}


def table(result: dict[str, Any]) -> str:
    """Markdown: per toy and teacher signal, the final and best eval metric and the teacher's seconds per step."""
    lines = ["| toy (metric, steps, seeds) | teacher signal | final | best eval | teacher s/step |",
             "|---|---|---|---|---|"]
    for toy, r in result["toys"].items():
        where = (f"{toy} ({r['metric']}, {r['steps']} steps, {len(r['seeds'])} seeds; start {r['student_before']:.3f}, "
                 f"teacher {r['teacher']:.3f})")
        for name, m in r["methods"].items():
            lines.append(f"| {where} | {LABELS[name]} | {mean_std(m['accuracy_final'])} | "
                         f"{mean_std(m['accuracy_best'])} | {np.median(m['teacher_seconds_per_step']):.4f} |")
    lines.append(f"\nK = {result['top_k']}; mean ± std over the seeds named per toy; teacher s/step: the median "
                 "measured teacher phase of a step on one shared CPU thread (CPU, 2 cores, shared).")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Per toy, the eval metric against steps (mean ± std band) for each teacher signal."""
    toys = result["toys"]
    fig, axes = plt.subplots(1, max(len(toys), 1), figsize=(max(5 * len(toys), 7), 4.2))
    for ax, (toy, r) in zip(np.atleast_1d(axes), toys.items()):
        for name, cs in r["curves"].items():
            steps = np.linspace(0, min(c["steps"][-1] for c in cs), 40)
            ys = np.array([np.interp(steps, c["steps"], c["accuracy"]) for c in cs])
            line, = ax.plot(steps, ys.mean(0), label=LABELS[name])
            ax.fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(), alpha=0.2)
        ax.axhline(r["teacher"], color="black", linestyle="--", label="teacher")
        ax.set_title(f"{toy} toy")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"eval {r['metric']}")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Top-{result['top_k']} + tail against the exact teacher (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
