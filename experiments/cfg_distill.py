"""CFG distillation on the image-token toy: an unguided student against the teacher at several CFG scales.

    python -m experiments cfg_distill [--out DIR] [--size tiny|full] [--publish]

The image toy (`mmopd toy image`: 16×16 pictures of 6 classes, a 64-code VQ-VAE, a judge classifier, a
0.35M teacher with an unconditional branch and a weaker 0.09M student) is built once. For each CFG scale
the student is distilled on-policy (reverse KL, the toy's settings: 200 steps of 32, lr 2e-3; seeds 0-2
change the batch order and the sampling) from the teacher guided at that scale, then sampled without
guidance. The trainer's picture report measures, on the 240 eval prompts at temperature 1, the judge's
accuracy, the toy FID and pictures per second (best of 3 timed batches) of the guided teacher, the
unguided teacher, the student before and after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.modality_task import build_toy, flat_overrides  # noqa: E402
from experiments.text_task import mean_std, save_results, run_config  # noqa: E402

NAME = "cfg_distill"
SIZES: dict[str, dict[str, Any]] = {
    "full": {"scales": (2.0, 3.0, 5.0, 1.5), "seeds": (0, 1, 2), "overrides": {}},
    "tiny": {"scales": (2.0,), "seeds": (0,), "overrides": {"train.steps": 2, "data.eval_limit": 12,
                                                           "train.eval_every": 0}},
}


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Distil from the teacher at each CFG scale, per seed; write results_cfg_distill.png, .json and .md.

    The image toy is built once in out/image_toy (shared with compute_matched_image)."""
    cfg = SIZES[size]
    flat = flat_overrides(build_toy(out / "image_toy", size, "image"))
    out = out / NAME
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in cfg["seeds"]:
        for scale in cfg["scales"]:
            run_dir = run_config(out / "runs" / f"cfg{scale:g}" / f"seed{seed}",
                                 {**flat, **cfg["overrides"], "teacher.cfg_scale": scale, "train.seed": seed})
            rows.setdefault(f"{scale:g}", []).append(json.loads((run_dir / "summary.json").read_text())["pictures"])
    result = {"scales": rows, "eval_pictures": rows[f"{cfg['scales'][0]:g}"][0]["eval_pictures"],
              "seeds": len(cfg["seeds"])}
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)
    return result


def _values(runs: list[dict[str, Any]], key: str, model: str) -> list[float]:
    return [r[key][model] for r in runs]


def table(result: dict[str, Any]) -> str:
    """Markdown: per CFG scale, the guided teacher and the unguided student distilled from it (mean ± std)."""
    rows = result["scales"]
    every = [r for runs in rows.values() for r in runs]  # the unguided teacher and the start, measured in every run

    def cells(runs: list[dict[str, Any]], model: str) -> str:
        return (f"{mean_std(_values(runs, 'classifier_accuracy', model))} | "
                f"{mean_std(_values(runs, 'fid', model), '.1f')}")

    lines = ["| model | judge accuracy | toy FID ↓ | pictures/s (1 CPU thread) | speed vs the guided teacher |",
             "|---|---|---|---|---|",
             f"| teacher, unguided (CFG 1) | {cells(every, 'teacher_unguided')} | "
             f"{np.median(_values(every, 'pictures_per_s', 'teacher_unguided')):.0f} | — |",
             f"| student before | {cells(every, 'student_before')} | — | — |"]
    for scale, runs in sorted(rows.items(), key=lambda kv: float(kv[0])):
        speedup = [r["student_speedup_over_guided_teacher"] for r in runs]
        lines.append(f"| teacher, CFG {scale} | {cells(runs, 'teacher')} | "
                     f"{np.median(_values(runs, 'pictures_per_s', 'teacher')):.0f} | 1× |")
        lines.append(f"| student after OPD from CFG {scale}, unguided | {cells(runs, 'student_after')} | "
                     f"{np.median(_values(runs, 'pictures_per_s', 'student_after')):.0f} | "
                     f"{np.median(speedup):.1f}× ({min(speedup):.1f}–{max(speedup):.1f}) |")
    lines.append(f"\n{result['eval_pictures']} eval pictures, temperature 1; mean ± std over {result['seeds']} "
                 "seeds (the unguided teacher and the start: over every run); pictures/s: median over runs of the "
                 "best of 3 timed batches on a shared CPU, speed-up: median (range) of each run's ratio.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Judge accuracy and toy FID against CFG scale, mean ± std over seeds: guided teacher, and the unguided
    student distilled from it."""
    rows = sorted(result["scales"].items(), key=lambda kv: float(kv[0]))
    scales = [float(s) for s, _ in rows]
    every = [r for _, runs in rows for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "classifier_accuracy", "judge accuracy"),
                           (axes[1], "fid", "toy FID (lower is better)")):
        for model, marker, name in (("teacher", "o-", "teacher with CFG at that scale"),
                                    ("student_after", "s-", "student distilled from it, no CFG")):
            values = [_values(runs, key, model) for _, runs in rows]
            ax.errorbar(scales, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], fmt=marker,
                        capsize=3, label=name)
        ax.axhline(np.mean(_values(every, key, "teacher_unguided")), color="grey", linestyle="--",
                   label="teacher, no CFG")
        ax.axhline(np.mean(_values(every, key, "student_before")), color="grey", linestyle=":", label="student before")
        ax.set_xlabel("teacher CFG scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CFG distillation, image-token toy ({result['eval_pictures']} eval pictures; "
                 f"mean ± std over {result['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
