"""Compute-matched comparison of the objectives, from one student start, three seeds, per modality.

    python -m experiments compute_matched [--out DIR] [--size tiny|full] [--publish]        # text toy
    python -m experiments compute_matched_vlm ...     # VLM toy (shapes VQA, LLaVA)
    python -m experiments compute_matched_image ...   # image-token toy (CFG teacher)

Every method starts from the same SFT'd student, with the same batch, lr and schedule (the toy's); the
seed changes the batch order and the sampling. Each gets a number of steps that spends at least the FLOPs
of the on_policy budget (cheaper steps: more of them). Compute is counted two ways: estimated FLOPs
(text_task.step_flops; seq_kd pays for the teacher's generations, on_policy for the student's) and
measured training seconds (metrics.jsonl `time/step`, eval excluded, one CPU thread).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.modality_task import build_modality_task, dataset_through_vq  # noqa: E402
from experiments.text_task import (SIZES, band, base_overrides, build_task, curve, mean_std, run_config,  # noqa: E402
                                   save_results, step_flops)

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
LONG = 4  # MODALITIES[...]["long"] methods also run for LONG × the budget: do they ever reach on_policy?
LABELS.update({f"{name}_long": f"{name}, {LONG}× the budget" for name in ("sft", "seq_kd")})
THRESHOLD = 0.75  # "reached": first eval at or above this accuracy
# the VLM and image toys: on_policy's step budget (the other methods' steps follow from their FLOPs per
# step), the "reached" threshold on the toy's metric, the plot's title and axis, the methods that also run
# for LONG × the budget, and what the metric measures (for the table)
MODALITIES: dict[str, dict[str, Any]] = {
    "vlm": {"budget_steps": 500, "threshold": 0.75, "title": "VLM toy (shapes VQA, LLaVA, lm_only)",
            "metric_label": "eval accuracy (exact match, greedy)", "long": (),
            "measure": "greedy exact match on the eval pictures' questions"},
    "image": {"budget_steps": 200, "threshold": 0.85, "title": "Image-token toy (CFG-2 teacher, unguided student)",
              "check_temperature": 0.7,
              "metric_label": "judge accuracy of sampled pictures", "long": ("sft", "seq_kd"),
              "measure": "the judge's accuracy on pictures sampled for the eval prompts, temperature 1"},
}


def method_runs(out: Path, size: str, names: list[str], extra: dict[str, dict[str, Any]] | None = None,
                seeds: tuple[int, ...] | None = None) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Train (or reuse) every named method for every seed (the size's, or these) on the text toy; return the
    task and the curves."""
    task = build_task(out, size)
    s = SIZES[size]
    methods = {**METHODS, **(extra or {})}
    steps = {n: max(int(methods[n][1] * s["scale"]), 2) for n in names}
    return task, seed_runs(out / "runs", s["seeds"] if seeds is None else seeds, {n: methods[n][0] for n in names},
                           steps, base_overrides(task, size), task)


def seed_runs(runs: Path, seeds: tuple[int, ...], methods: dict[str, dict[str, Any]], steps: dict[str, int],
              base: dict[str, Any], task: dict[str, Any], evals: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Train (or reuse) each method for each seed, about `evals` evals a run; each method's curves."""
    curves: dict[str, list[dict[str, Any]]] = {n: [] for n in methods}
    for seed in seeds:  # seed-major: a cut-short experiment still has whole seeds
        for name, overrides in methods.items():
            every = max(steps[name] // evals // 5 * 5, 1)
            run_dir = run_config(runs / name / f"seed{seed}",
                                 {**base, **overrides, "train.steps": steps[name], "train.eval_every": every,
                                  "train.seed": seed})
            curves[name].append(curve(run_dir, task))
    return curves


def matched_steps(task: dict[str, Any], budget_steps: int, batch_size: int, response_tokens: float) -> dict[str, int]:
    """Steps per method that spend at least the FLOPs of `budget_steps` on_policy steps, by step_flops at
    `response_tokens` per response (gkd: on-policy on λ of its steps), rounded up to a multiple of 10."""
    def per_step(name: str) -> float:
        overrides = METHODS[name][0]
        kind = overrides["objective.kind"]
        row = {"response_tokens": batch_size * response_tokens}
        if kind == "gkd":
            lmbda = overrides["objective.lmbda"]
            return lmbda * step_flops({**row, "on_policy": 1.0}, kind, task, batch_size) + \
                (1 - lmbda) * step_flops(row, kind, task, batch_size)
        return step_flops({**row, "on_policy": float(kind == "on_policy")}, kind, task, batch_size)

    budget = budget_steps * per_step("on_policy_full")
    return {name: int(np.ceil(budget / per_step(name) / 10) * 10) for name in METHODS}


def modality_runs(out: Path, size: str, modality: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Build the modality's toy once, then train (or reuse) every method for every seed on it."""
    task = build_modality_task(out / f"{modality}_toy", size, modality)
    base = {**task["base"], "train.save_every": 0}
    if size == "tiny":
        base = {**base, "data.eval_limit": 6, "train.batch_size": 4}
    budget = MODALITIES[modality]["budget_steps"] if size == "full" else 2
    steps = matched_steps(task, budget, base["train.batch_size"], task["response_tokens"])
    long = MODALITIES[modality]["long"]
    steps.update({f"{name}_long": LONG * steps[name] for name in long})
    if size == "tiny":
        steps = {name: 2 for name in steps}
    methods = {**{name: overrides for name, (overrides, _) in METHODS.items()},
               **{f"{name}_long": METHODS[name][0] for name in long}}
    return task, seed_runs(out / f"{NAME}_{modality}" / "runs", SIZES[size]["seeds"], methods, steps, base, task)


def final_metric(run_dir: Path, metric: str, temperature: float) -> float:
    """The run's final student evaluated again with eval sampling at `temperature` (cached in the run dir)."""
    import mmopd
    from mmopd.config import load_config

    cache = run_dir / f"eval_temperature{temperature:g}.json"
    if not cache.exists():
        config = load_config(run_dir / "config.yaml", {"rollout.temperature": temperature, "train.progress": False})
        cache.write_text(json.dumps(mmopd.evaluate(config, str(run_dir / "final"))))
    return json.loads(cache.read_text())[metric]


def first_reach(c: dict[str, Any], axis: str, threshold: float) -> float | None:
    """Compute (on axis) at the first eval at or above threshold, or None."""
    for x, acc in zip(c[axis], c["accuracy"]):
        if acc >= threshold:
            return x
    return None


def accuracy_at(c: dict[str, Any], axis: str, budget: float) -> float:
    """Accuracy of the last eval whose compute is within the budget."""
    return [a for x, a in zip(c[axis], c["accuracy"]) if x <= budget * 1.0001][-1]


def summarize(task: dict[str, Any], curves: dict[str, list[dict[str, Any]]], threshold: float = THRESHOLD,
              measure: str = "greedy exact match on the eval prompts") -> dict[str, Any]:
    """Per method: accuracy at the FLOP budget (on_policy_full's), final accuracy, compute to reach threshold."""
    budget = float(np.mean([c["flops"][-1] for c in curves["on_policy_full"]])) if "on_policy_full" in curves \
        else min(c["flops"][-1] for cs in curves.values() for c in cs)
    rows = {}
    for name, cs in curves.items():
        reach = [first_reach(c, "flops", threshold) for c in cs]
        reach_s = [first_reach(c, "seconds", threshold) for c in cs]
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
    return {"budget_tflops": budget / 1e12, "threshold": threshold, "modality": task.get("modality", "text"),
            "metric": task.get("metric", "accuracy"), "measure": measure, "teacher": teacher, "student_before": before,
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
             f"TFLOPs total | train s total | s/step | TFLOPs to {result['threshold']} | "
             f"train s to {result['threshold']} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        lines.append(f"| {LABELS.get(name, name)} | {r['steps']} | {mean_std(r['accuracy_at_budget'])} | "
                     f"{mean_std(r['accuracy_final'])} | {np.mean(r['tflops_total']):.3g} | "
                     f"{np.mean(r['seconds_total']):.0f} | {np.mean(r['seconds_per_step']):.3f} | "
                     f"{reach(r['tflops_to_reach'], '')} | {reach(r['seconds_to_reach'], 's')} |")
    lines.append(f"\nTeacher {result['teacher']:.3f}, student start {result['student_before']:.3f} "
                 f"({result['measure']}); mean ± std over {result['seeds']} seeds.")
    if "dataset_through_vq" in result:  # sft's target: the dataset's own pictures as the VQ codes them
        data = result["dataset_through_vq"]
        lines.append(f"The dataset's eval pictures after a round trip through the VQ score "
                     f"{data['classifier_accuracy']:.3f} (toy FID {data['fid']:.1f}).")
    if "lower_temperature" in result:  # the final students sampled at a lower temperature
        check = result["lower_temperature"]
        lines.append(f"\nThe final students sampled at temperature {check['temperature']:g} instead of 1:\n\n"
                     f"| method | {result['metric']} at temperature 1 | at {check['temperature']:g} |\n|---|---|---|")
        for name, values in check["methods"].items():
            lines.append(f"| {LABELS.get(name, name)} | {mean_std(result['methods'][name]['accuracy_final'])} | "
                         f"{mean_std(values)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, title: str = "Text toy (3-digit addition)",
         metric_label: str = "eval accuracy (exact match, greedy)") -> None:
    """Accuracy against FLOPs and against training seconds, mean ± std band over seeds, teacher as a line;
    with runs at LONG × the budget (`*_long`), a third panel sets them against on_policy over their length."""
    names = list(result["curves"])
    long = [n for n in names if n.endswith("_long")]
    short = [n for n in names if n not in long]
    fig, axes = plt.subplots(1, 3 if long else 2, figsize=(17 if long else 12, 4.5))
    panels = [(axes[0], "flops", 1e12, "training compute (TFLOPs, estimated)", short),
              (axes[1], "seconds", 1.0, "training time (s, 1 CPU thread, eval excluded)", short)]
    if long:
        panels.append((axes[2], "flops", 1e12, "training compute (TFLOPs, estimated)", ["on_policy_full", *long]))
        axes[2].set_title(f"{' and '.join(n.removesuffix('_long') for n in long)} for {LONG}× the budget",
                          fontsize=9)
    for ax, axis, scale, unit, panel in panels:
        for name in panel:
            grid, mean, std = band(result["curves"][name], axis)
            line, = ax.plot(grid / scale, mean, label=LABELS.get(name, name),
                            color=f"C{short.index(name.removesuffix('_long'))}",
                            linestyle=":" if name in long else "-")
            ax.fill_between(grid / scale, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.axhline(result["teacher"], color="black", linestyle="--", label="teacher")
        if axis == "flops":
            ax.axvline(result["budget_tflops"], color="grey", linestyle=":",
                       label=f"budget ({result['methods']['on_policy_full']['steps']} on_policy steps)")
        ax.set_xlabel(unit)
        ax.set_ylabel(metric_label)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    if long:
        axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}: student {result['metric']} vs compute; mean ± std over "
                 f"{result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Run every method for every seed on the text toy, then write results_compute_matched.png, .json and .md."""
    task, curves = method_runs(out, size, list(METHODS))
    result = summarize(task, curves)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)
    return result


def run_modality(out: Path, size: str, root: Path | None, modality: str) -> dict[str, Any]:
    """The same comparison on the vlm or image toy: results_compute_matched_MODALITY.png, .json, .md in out."""
    name, settings = f"{NAME}_{modality}", MODALITIES[modality]
    task, curves = modality_runs(out, size, modality)
    result = summarize(task, curves, settings["threshold"], settings["measure"])
    if modality == "image":
        result["dataset_through_vq"] = dataset_through_vq(task)
        temperature = settings["check_temperature"]
        runs = out / f"{NAME}_{modality}" / "runs"
        result["lower_temperature"] = {"temperature": temperature, "methods": {
            name: [final_metric(runs / name / f"seed{seed}", task["metric"], temperature)
                   for seed in SIZES[size]["seeds"]] for name in curves if not name.endswith("_long")}}
    plot(result, out / f"results_{name}.png", settings["title"], settings["metric_label"])
    save_results(out, name, result, table(result), root)
    return result
