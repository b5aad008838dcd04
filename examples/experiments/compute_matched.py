"""Compute-matched comparison of the objectives on the text toy, from one student start, three seeds.

    python -m examples.experiments compute_matched [--out DIR] [--size tiny|full] [--publish]

Every method starts from the same SFT'd student, with the same batch (64 prompts), lr and schedule; the
seed changes the batch order and the sampling. Each gets a number of steps that spends at least the FLOPs
of 200 on_policy steps (cheaper steps: more of them). Compute is counted two ways: estimated FLOPs
(text_task.step_flops; seq_kd pays for the teacher's generations, on_policy for the student's) and
measured training seconds (metrics.jsonl `time/step`, eval excluded, one CPU thread, shared machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from examples.experiments.text_task import (SIZES, band, base_overrides, build_task, curve, mean_std,  # noqa: E402
                                            save_results, run_config)

NAME = "compute_matched"
# name: (overrides, steps at the full size); steps make each method's FLOPs ≥ 200 on_policy steps'
METHODS: dict[str, tuple[dict[str, Any], int]] = {
    "on_policy_full": ({"objective.kind": "on_policy", "objective.estimator": "full"}, 200),
    "on_policy_sampled": ({"objective.kind": "on_policy", "objective.estimator": "sampled"}, 200),
    "gkd": ({"objective.kind": "gkd", "objective.divergence": "jsd", "objective.lmbda": 0.5,
             "objective.beta": 0.5}, 230),
    "supervised_kd": ({"objective.kind": "supervised_kd", "objective.divergence": "forward_kl"}, 250),
    "seq_kd": ({"objective.kind": "seq_kd"}, 250),
    "sft": ({"objective.kind": "sft"}, 400),
}
LABELS = {"on_policy_full": "on_policy, full reverse KL", "on_policy_sampled": "on_policy, sampled-token",
          "gkd": "gkd (λ=0.5, JSD β=0.5)", "supervised_kd": "supervised_kd (forward KL)",
          "seq_kd": "seq_kd (teacher samples)", "sft": "sft (dataset answers)"}
THRESHOLD = 0.75  # "reached": first eval at or above this accuracy


def method_runs(out: Path, size: str, names: list[str], extra: dict[str, dict[str, Any]] | None = None
                ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Train (or reuse) every named method for every seed; return the task and each method's curves."""
    task = build_task(out, size)
    s = SIZES[size]
    methods = {**METHODS, **(extra or {})}
    curves: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for seed in s["seeds"]:  # seed-major: a cut-short experiment still has whole seeds
        for name in names:
            overrides, steps = methods[name]
            steps = max(int(steps * s["scale"]), 2)
            every = max(steps // 8 // 5 * 5, 1)
            run_dir = run_config(out / "runs" / name / f"seed{seed}",
                                 {**base_overrides(task, size), **overrides, "train.steps": steps,
                                  "train.eval_every": every, "train.seed": seed})
            curves[name].append(curve(run_dir, task))
    return task, curves


def first_reach(c: dict[str, Any], axis: str, threshold: float) -> float | None:
    """Compute (on axis) at the first eval at or above threshold, or None."""
    for x, acc in zip(c[axis], c["accuracy"]):
        if acc >= threshold:
            return x
    return None


def accuracy_at(c: dict[str, Any], axis: str, budget: float) -> float:
    """Accuracy of the last eval whose compute is within the budget."""
    return [a for x, a in zip(c[axis], c["accuracy"]) if x <= budget * 1.0001][-1]


def summarize(task: dict[str, Any], curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: accuracy at the FLOP budget (200 on_policy steps), final accuracy, compute to reach."""
    budget = float(np.mean([c["flops"][-1] for c in curves["on_policy_full"]])) if "on_policy_full" in curves \
        else min(c["flops"][-1] for cs in curves.values() for c in cs)
    rows = {}
    for name, cs in curves.items():
        reach = [first_reach(c, "flops", THRESHOLD) for c in cs]
        reach_s = [first_reach(c, "seconds", THRESHOLD) for c in cs]
        rows[name] = {
            "steps": cs[0]["steps"][-1],
            "accuracy_at_budget": [accuracy_at(c, "flops", budget) for c in cs],
            "accuracy_final": [c["accuracy"][-1] for c in cs],
            "tflops_total": [c["flops"][-1] / 1e12 for c in cs],
            "seconds_total": [c["seconds"][-1] for c in cs],
            "seconds_per_step": [c["seconds_per_step"] for c in cs],
            "tflops_to_reach": [r / 1e12 if r is not None else None for r in reach],
            "seconds_to_reach": reach_s,
        }
    teacher = curves[next(iter(curves))][0]["teacher"]
    before = curves[next(iter(curves))][0]["student_before"]
    return {"budget_tflops": budget / 1e12, "threshold": THRESHOLD, "teacher": teacher, "student_before": before,
            "params": task["params"], "seeds": len(next(iter(curves.values()))), "methods": rows,
            "curves": curves}


def table(result: dict[str, Any]) -> str:
    """The markdown table of the summary (mean ± std over seeds)."""

    def reach(values: list[float | None], unit: str) -> str:
        hits = [v for v in values if v is not None]
        if not hits:
            return "not reached"
        text = f"{np.mean(hits):.3g} {unit}"
        return text if len(hits) == len(values) else f"{text} ({len(hits)}/{len(values)} seeds)"

    lines = [f"| method | steps | accuracy at {result['budget_tflops']:.3g} TFLOPs | final accuracy | "
             f"TFLOPs total | train s total | s/step | TFLOPs to {THRESHOLD} | train s to {THRESHOLD} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        lines.append(f"| {LABELS.get(name, name)} | {r['steps']} | {mean_std(r['accuracy_at_budget'])} | "
                     f"{mean_std(r['accuracy_final'])} | {np.mean(r['tflops_total']):.3g} | "
                     f"{np.mean(r['seconds_total']):.0f} | {np.mean(r['seconds_per_step']):.3f} | "
                     f"{reach(r['tflops_to_reach'], '')} | {reach(r['seconds_to_reach'], 's')} |")
    lines.append(f"\nTeacher {result['teacher']:.3f}, student start {result['student_before']:.3f} "
                 f"(greedy exact match on the eval prompts); mean ± std over {result['seeds']} seeds.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against FLOPs and against training seconds, mean ± std band over seeds, teacher as a line."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, axis, scale, unit in ((axes[0], "flops", 1e12, "training compute (TFLOPs, estimated)"),
                                  (axes[1], "seconds", 1.0, "training time (s, 1 CPU thread, eval excluded)")):
        for name, cs in result["curves"].items():
            grid, mean, std = band(cs, axis)
            line, = ax.plot(grid / scale, mean, label=LABELS.get(name, name))
            ax.fill_between(grid / scale, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.axhline(result["teacher"], color="black", linestyle="--", label="teacher")
        if axis == "flops":
            ax.axvline(result["budget_tflops"], color="grey", linestyle=":", label="budget (200 on_policy steps)")
        ax.set_xlabel(unit)
        ax.set_ylabel("eval accuracy (exact match, greedy)")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Text toy (3-digit addition): student accuracy vs compute; mean ± std over "
                 f"{result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Run every method for every seed, then write results_compute_matched.png, .json and .md in out."""
    task, curves = method_runs(out, size, list(METHODS))
    result = summarize(task, curves)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)
    return result
