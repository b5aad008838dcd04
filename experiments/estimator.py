"""Full reverse KL vs the sampled-token estimator vs a top-k teacher, on the text toy.

    python -m experiments estimator [--out DIR] [--size tiny|full] [--publish]

The same on_policy runs as compute_matched (same student start, batch 64, lr 2e-3, 200 steps; those runs
are reused when --out is shared), plus the teacher kept to its top K logits (`teacher.top_k`, K = 4 and 12
of the 24-token vocabulary) and the sampled-token estimator at lower learning rates and with 4 samples per
prompt (`rollout.samples_per_prompt`: 4× the sequences, and the FLOPs, of a step). Quality: eval accuracy
against steps. Teacher cost: measured seconds per step in the teacher phase (`time/teacher`) and the
numbers the teacher hands over per response token (V logits, K logits + K ids, or one log-prob).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from experiments.compute_matched import method_runs  # noqa: E402
from experiments.text_task import mean_std, save_results  # noqa: E402

NAME = "estimator"
TOP_KS = (4, 12)
SAMPLED = {"on_policy_sampled_lr1e-3": ({"train.lr": 1e-3}, "lr 1e-3", "lr 1e-3"),
           "on_policy_sampled_lr5e-4": ({"train.lr": 5e-4}, "lr 5e-4", "lr 5e-4"),
           "on_policy_sampled_lr1e-3_n4": ({"train.lr": 1e-3, "rollout.samples_per_prompt": 4},
                                           "lr 1e-3, 4 samples per prompt", "lr 1e-3,\n4/prompt")}
EXTRA: dict[str, tuple[dict[str, Any], int]] = {
    **{f"on_policy_top{k}": ({"objective.kind": "on_policy", "objective.estimator": "full", "teacher.top_k": k}, 200)
       for k in TOP_KS},
    **{name: ({"objective.kind": "on_policy", "objective.estimator": "sampled", **o}, 200)
       for name, (o, _, _) in SAMPLED.items()},
}
LABELS = {"on_policy_full": "full reverse KL (all V logits)", "on_policy_sampled": "sampled-token estimator",
          **{f"on_policy_top{k}": f"top-{k} teacher (renormalised)" for k in TOP_KS},
          **{name: f"sampled-token estimator, {label}" for name, (_, label, _) in SAMPLED.items()}}
SHORT = {"on_policy_full": "full", "on_policy_sampled": "sampled", **{f"on_policy_top{k}": f"top-{k}" for k in TOP_KS},
         **{name: f"sampled,\n{short}" for name, (_, _, short) in SAMPLED.items()}}


def numbers_per_token(name: str, vocab: int) -> int:
    """What the teacher hands over per response token: V logits, K values + K ids, or one log-prob."""
    if "sampled" in name:
        return 1
    if "_top" in name:
        return 2 * int(name.rsplit("top", 1)[1])
    return vocab


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Run (or reuse) every variant for every seed; write results_estimator.png, .json and .md."""
    names = ["on_policy_full", "on_policy_sampled", *EXTRA]
    task, curves = method_runs(out, size, names, EXTRA)
    vocab = transformers.AutoConfig.from_pretrained(task["paths"]["teacher"]).vocab_size
    rows = {name: {"accuracy_final": [c["accuracy"][-1] for c in cs],
                   "accuracy_best": [max(c["accuracy"]) for c in cs],
                   "teacher_seconds_per_step": [c["teacher_seconds_per_step"] for c in cs],
                   "seconds_per_step": [c["seconds_per_step"] for c in cs],
                   "teacher_numbers_per_token": numbers_per_token(name, vocab)} for name, cs in curves.items()}
    result = {"teacher": curves["on_policy_full"][0]["teacher"], "vocab": vocab, "top_k": list(TOP_KS),
              "seeds": len(curves["on_policy_full"]), "methods": rows, "curves": curves}
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: final and best accuracy, teacher seconds per step, teacher numbers per token."""
    lines = ["| teacher signal | final accuracy | best eval accuracy | teacher s/step | step s | "
             "teacher numbers per token |", "|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        lines.append(f"| {LABELS[name]} | {mean_std(r['accuracy_final'])} | {mean_std(r['accuracy_best'])} | "
                     f"{np.median(r['teacher_seconds_per_step']):.4f} | {np.mean(r['seconds_per_step']):.3f} | "
                     f"{r['teacher_numbers_per_token']} |")
    lines.append(f"\nTeacher accuracy {result['teacher']:.3f}; mean ± std over {result['seeds']} seeds; "
                 "s/step are medians/means of measured times on one shared CPU thread.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against steps (mean ± std band) and the teacher's seconds per step."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for name, cs in result["curves"].items():
        steps = np.linspace(0, min(c["steps"][-1] for c in cs), 40)
        ys = np.array([np.interp(steps, c["steps"], c["accuracy"]) for c in cs])
        line, = axes[0].plot(steps, ys.mean(0), label=LABELS[name])
        axes[0].fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(), alpha=0.2)
    axes[0].axhline(result["teacher"], color="black", linestyle="--", label="teacher")
    axes[0].set_xlabel("training step (64 prompts each; ×4 samples where marked)")
    axes[0].set_ylabel("eval accuracy (exact match, greedy)")
    axes[0].set_ylim(-0.02, 1.05)
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    names = list(result["methods"])
    values = [np.median(result["methods"][n]["teacher_seconds_per_step"]) * 1000 for n in names]
    axes[1].bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
    axes[1].set_xticks(range(len(names)), [SHORT[n] for n in names], fontsize=7, rotation=35, ha="right")
    axes[1].set_ylabel("teacher time per step (ms, median, 1 CPU thread)")
    axes[1].grid(alpha=0.3, axis="y")
    fig.suptitle(f"Teacher signal for on-policy distillation, text toy; mean ± std over {result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
