"""The published regime: on-policy distillation against continued SFT on teacher samples, from an SFT plateau.

    python -m experiments published_regime [--out DIR] [--size tiny|full] [--publish]

Stage 1 (the plateau): SFT the text toy's student on a data generator's samples, one seed, evaluating
every EVERY steps, and take the checkpoint where the greedy accuracy stops improving: the first eval
within TOL of the run's best, with at least PATIENCE evals after it (none of which gains more than TOL on
it). Two data generators:
- `teacher`: the toy's teacher itself (`seq_kd`: NLL on teacher samples drawn afresh every step), which is
  off-policy distillation, as the published student had;
- `carry_blind`: a program that drops the carry into the last column (`964+494=` → `08;15;13;#1358`, wrong
  wherever the tens column carries), so the teacher (the toy's, right on every eval prompt) knows more
  than the data.
Stage 2, from each plateau that leaves at least MIN_ROOM below the teacher: `on_policy` (full reverse KL to
the teacher) against `seq_kd` (continued SFT on more teacher samples), matched by estimated FLOPs
(`compute_matched.matched_steps`), 3 seeds, at the toy's lr and at a lower one (SETTINGS). The target is
halfway from the plateau to the teacher; the result is each method's FLOPs to first reach it and to stay
at or above it, and their ratios (published: 9–30× less for on-policy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import mmopd  # noqa: E402
from experiments.compute_matched import LABELS, METHODS, first_reach, matched_steps, seed_runs, summarize  # noqa: E402
from experiments.compute_matched import table as compare_table  # noqa: E402
from experiments.text_task import (SIZES, band, base_overrides, build_task, checkpointed_run, mean_std,  # noqa: E402
                                   save_results)
from mmopd.config import load_config  # noqa: E402
from modalities.text.adapter import is_correct  # noqa: E402
from modalities.text.toy import FINAL_MARKER, STEP_SEP  # noqa: E402

NAME = "published_regime"
PLATEAU_STEPS = {"full": 400, "tiny": 4}
EVERY = {"full": 25, "tiny": 1}
PATIENCE = 4  # evals without a gain of more than TOL: a plateau
TOL = 0.01
MIN_ROOM = {"full": 0.05, "tiny": -1.0}  # tiny: random models leave no room; stage 2 runs to test the plumbing
BUDGET_STEPS = {"full": 200, "tiny": 2}  # on_policy's steps in stage 2; seq_kd's follow from the FLOPs
COMPARED = ("on_policy_full", "seq_kd")
# stage 2's learning rates: the toy's (as section 1), and a gentler continuation, with evals more often
SETTINGS: dict[str, dict[str, Any]] = {
    "toy_lr": {"label": "lr 2e-3, warmup 50 (the toy's)", "overrides": {}, "evals": 8, "dir": "runs"},
    "low_lr": {"label": "lr 5e-4, warmup 10", "overrides": {"train.lr": 5e-4, "train.warmup": 10}, "evals": 20,
               "dir": "runs_low_lr"},
}
GENERATORS: dict[str, dict[str, str]] = {
    "teacher": {"kind": "seq_kd", "label": "the teacher's samples (seq_kd)"},
    "carry_blind": {"kind": "sft", "label": "a carry-blind program's answers (sft)"},
}


def carry_blind_answer(prompt: str) -> str:
    """The answer to `A+B=` in the toy's format, computed without the carry into the last column (right when
    there is none)."""
    a, b = prompt.rstrip("=").split("+")
    xs, ys = str(a)[::-1], str(b)[::-1]
    sums, carry = [], 0
    for i, (x, y) in enumerate(zip(xs, ys)):
        total = int(x) + int(y) + (carry if i < len(xs) - 1 else 0)
        sums.append(total)
        carry = total // 10
    value = sum(t % 10 * 10 ** i for i, t in enumerate(sums)) + carry * 10 ** len(sums)
    return "".join(f"{t:02d}{STEP_SEP}" for t in sums) + FINAL_MARKER + str(value)


def carry_blind_data(train: Path, path: Path) -> Path:
    """The toy's training prompts with carry-blind answers, written once."""
    if not path.exists():
        records = [json.loads(line) for line in train.read_text().splitlines()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": carry_blind_answer(r["prompt"])}) + "\n"
                                for r in records))
    return path


def plateau_at(accuracy: list[float]) -> int | None:
    """Index of the first eval within TOL of the run's best, if at least PATIENCE evals follow it (none of which
    can then gain more than TOL on it): the plateau's start. An early dip does not count as one."""
    first = next(i for i, a in enumerate(accuracy) if a >= max(accuracy) - TOL)
    return first if first + PATIENCE < len(accuracy) else None


def plateau_run(out_dir: Path, overrides: dict[str, Any], size: str) -> dict[str, Any]:
    """Stage 1: train with a checkpoint at every eval, keep the plateau's student as out_dir/plateau (cached)."""
    info_path = out_dir / "plateau.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    _, evals = checkpointed_run(out_dir, {**overrides, "train.steps": PLATEAU_STEPS[size]}, EVERY[size])
    steps = sorted(evals)
    accuracy = [evals[s] for s in steps]
    found = plateau_at(accuracy)
    index = found if found is not None else len(steps) - 1
    if steps[index] == 0:
        shutil.copytree(overrides["student.path"], out_dir / "plateau")
    else:
        shutil.move(out_dir / "checkpoints" / f"step-{steps[index]}" / "model", out_dir / "plateau")
    shutil.rmtree(out_dir / "checkpoints")
    info = {"steps": steps, "accuracy": accuracy, "plateau_step": steps[index], "plateau": accuracy[index],
            "found": found is not None, "path": str(out_dir / "plateau")}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Stage 1 for each generator, stage 2 from each plateau with room; results_published_regime.png, .json, .md."""
    task = build_task(out, size)
    base = base_overrides(task, size)
    here = out / NAME
    data = {"teacher": task["paths"]["train"],
            "carry_blind": str(carry_blind_data(Path(task["paths"]["train"]), here / "carry_blind" / "train.jsonl"))}
    plateaus = {name: plateau_run(here / "plateau" / name, {**base, "objective.kind": g["kind"],
                                                            "data.train": data[name], "train.seed": 0}, size)
                for name, g in GENERATORS.items()}
    teacher = mmopd.evaluate(load_config(None, base), which="teacher")["accuracy"]
    records = [json.loads(line) for line in Path(task["paths"]["eval"]).read_text().splitlines()]
    data_accuracy = {"teacher": teacher, "carry_blind": float(np.mean([  # the SFT data's own score
        is_correct(carry_blind_answer(r["prompt"]), r["answer"]) for r in records[:base["data.eval_limit"]]]))}
    response_tokens = float(np.mean([len(r["answer"]) + 1 for r in records]))  # characters, and EOS
    steps = matched_steps(task, BUDGET_STEPS[size], base["train.batch_size"], response_tokens)
    steps = {name: steps[name] if size == "full" else 2 for name in COMPARED}
    methods = {name: METHODS[name][0] for name in COMPARED}
    result: dict[str, Any] = {"teacher": teacher, "data_accuracy": data_accuracy, "plateaus": plateaus,
                              "room": MIN_ROOM[size], "compared": {}}
    write(out, result, root)
    for name, info in plateaus.items():
        if teacher - info["plateau"] < MIN_ROOM[size]:
            continue
        target = round(info["plateau"] + 0.5 * (teacher - info["plateau"]), 3)
        result["compared"][name] = {}
        for setting, spec in SETTINGS.items():
            start = {**base, **spec["overrides"], "student.path": info["path"]}
            curves: dict[str, list[dict[str, Any]]] = {n: [] for n in COMPARED}
            for seed in SIZES[size]["seeds"]:  # results written after every seed: a cut-short run keeps its seeds
                for n, cs in seed_runs(here / name / spec["dir"], (seed,), methods, steps, start, task,
                                       spec["evals"]).items():
                    curves[n] += cs
                result["compared"][name][setting] = with_ratios(summarize(task, curves, target))
                write(out, result, root)
    return result


def stays_from(c: dict[str, Any], threshold: float, axis: str = "flops") -> float | None:
    """Compute (on axis) at the first eval from which every later eval is at or above threshold, or None."""
    for i in range(len(c["accuracy"])):
        if min(c["accuracy"][i:]) >= threshold:
            return c[axis][i]
    return None


def with_ratios(summary: dict[str, Any]) -> dict[str, Any]:
    """Add each method's FLOPs to stay above the target, and seq_kd's FLOPs over on_policy's to first reach the
    target and to stay above it, from the seed means (None where a seed never got there)."""
    for n in COMPARED:
        cs, threshold = summary["curves"][n], summary["threshold"]
        summary["methods"][n]["tflops_to_stay"] = [
            None if (f := stays_from(c, threshold)) is None else f / 1e12 for c in cs]
        summary["methods"][n]["steps_to_reach"] = [first_reach(c, "steps", threshold) for c in cs]
        summary["methods"][n]["steps_to_stay"] = [stays_from(c, threshold, "steps") for c in cs]
    per_step = {n: np.mean(summary["methods"][n]["tflops_total"]) / summary["methods"][n]["steps"] for n in COMPARED}
    summary["step_cost_ratio"] = float(per_step["on_policy_full"] / per_step["seq_kd"])
    for key in ("tflops_to_reach", "tflops_to_stay"):
        values = {n: summary["methods"][n][key] for n in COMPARED}
        hit = all(v is not None for vs in values.values() for v in vs) and np.mean(values["on_policy_full"]) > 0
        summary[f"ratio_{key.removeprefix('tflops_to_')}"] = \
            float(np.mean(values["seq_kd"]) / np.mean(values["on_policy_full"])) if hit else None
    return summary


def write(out: Path, result: dict[str, Any], root: Path | None) -> None:
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)


def table(result: dict[str, Any]) -> str:
    """Markdown: each plateau, then for each plateau with room the FLOP-matched comparison and the ratio."""
    lines = ["| SFT data (stage 1) | the data's own accuracy | plateau step | plateau accuracy | teacher | "
             "room above the plateau |", "|---|---|---|---|---|---|"]
    for name, info in result["plateaus"].items():
        step = f"{info['plateau_step']}" + ("" if info["found"] else " (no plateau: the last eval)")
        lines.append(f"| {GENERATORS[name]['label']} | {result['data_accuracy'][name]:.3f} | {step} | "
                     f"{info['plateau']:.3f} | {result['teacher']:.3f} | "
                     f"{result['teacher'] - info['plateau']:.3f} |")
    lines.append(f"\nPlateau: the first eval (every {EVERY['full']} steps) within {TOL} of the run's best, with at "
                 f"least {PATIENCE} evals after it; one seed. The data's own accuracy: the teacher's (greedy) for its "
                 "samples, the answers' for a program's. Stage 2 runs where the room is at least "
                 f"{MIN_ROOM['full']}.\n")
    for name, settings in result["compared"].items():
        for setting, summary in settings.items():
            lines.append(f"From the plateau on {GENERATORS[name]['label']}, {SETTINGS[setting]['label']} (target "
                         f"{summary['threshold']:.3f}, halfway to the teacher):\n")
            lines.append(compare_table(summary))
            lines += [f"| method | steps to first reach {summary['threshold']:.3f} | steps to stay at or above it | "
                      "TFLOPs to first reach it | TFLOPs to stay at or above it |", "|---|---|---|---|---|"]
            for n in COMPARED:
                r = summary["methods"][n]
                lines.append(f"| {LABELS[n]} | {reach_text(r['steps_to_reach'], '.0f')} | "
                             f"{reach_text(r['steps_to_stay'], '.0f')} | {reach_text(r['tflops_to_reach'])} | "
                             f"{reach_text(r['tflops_to_stay'])} |")
            lines.append(f"| **seq_kd / on_policy (FLOPs)** | | | {ratio_text(summary['ratio_reach'])} | "
                         f"{ratio_text(summary['ratio_stay'])} |\n")
            lines.append(f"An on_policy step costs {summary['step_cost_ratio']:.2f}× the estimated FLOPs of a seq_kd "
                         "step.\n")
    lines.append("Ratios above 1 mean on_policy needs less compute (published: 9–30×); mean ± std over seeds.\n")
    return "\n".join(lines)


def reach_text(values: list[float | None], fmt: str = ".3f") -> str:
    hits = [v for v in values if v is not None]
    if len(hits) < len(values):
        return f"not reached ({len(values) - len(hits)}/{len(values)} seeds)"
    return mean_std(hits, fmt)


def ratio_text(ratio: float | None) -> str:
    return "not defined (a seed never got there)" if ratio is None else f"**{ratio:.2f}×**"


def plot(result: dict[str, Any], path: Path) -> None:
    """Stage 1's curves with their plateaus; stage 2's accuracy against FLOPs per setting (mean ± std over seeds)."""
    fig, axes = plt.subplots(1, 1 + len(SETTINGS), figsize=(6 * (1 + len(SETTINGS)), 4.5))
    for i, (name, info) in enumerate(result["plateaus"].items()):
        axes[0].plot(info["steps"], info["accuracy"], color=f"C{i}", label=f"SFT on {GENERATORS[name]['label']}")
        axes[0].plot([info["plateau_step"]], [info["plateau"]], "o", color=f"C{i}")
    axes[0].set_xlabel("stage 1: SFT step (64 prompts each)")
    axes[0].set_title("stage 1: to the plateau (dot)", fontsize=9)
    for ax, (setting, spec) in zip(axes[1:], SETTINGS.items()):
        for j, (name, settings) in enumerate(result["compared"].items()):
            if setting not in settings:
                continue
            summary = settings[setting]
            for k, method in enumerate(COMPARED):
                grid, mean, std = band(summary["curves"][method], "flops")
                line, = ax.plot(grid / 1e12, mean, color=f"C{2 + 2 * j + k}",
                                label=f"{LABELS[method]}, from the {name} plateau")
                ax.fill_between(grid / 1e12, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.axhline(summary["threshold"], color="grey", linestyle=":", label=f"target ({name})")
        ax.set_xlabel("stage 2: training compute (TFLOPs, estimated)")
        ax.set_title(f"stage 2, {spec['label']}", fontsize=9)
    for ax in axes:
        ax.axhline(result["teacher"], color="black", linestyle="--", label="teacher")
        ax.set_ylabel("eval accuracy (exact match, greedy)")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("OPD against continued SFT on teacher samples, from an SFT plateau (text toy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
