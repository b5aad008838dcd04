"""CFG distillation on the image-token toy: an unguided student against the teacher at several CFG scales.

    python -m examples.experiments cfg_distill [--out DIR] [--size tiny|full] [--publish]

The image toy (`mmopd toy image`: 16×16 pictures of 6 classes, a 64-code VQ-VAE, a judge classifier, a
0.35M teacher with an unconditional branch and a weaker 0.09M student) is built once. For each CFG scale
the student is distilled on-policy (reverse KL, the toy's settings: 200 steps of 32, lr 2e-3) from the
teacher guided at that scale, then sampled without guidance. The trainer's picture report measures, on
the 240 eval prompts at temperature 1, the judge's accuracy, the toy FID and pictures per second (best of
3 timed batches) of the guided teacher, the unguided teacher, the student before and after.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from examples.experiments.text_task import save_results, run_config  # noqa: E402

NAME = "cfg_distill"
SIZES: dict[str, dict[str, Any]] = {
    "full": {"scales": (2.0, 3.0, 5.0, 1.5), "overrides": {}},
    "tiny": {"scales": (2.0,), "overrides": {"train.steps": 2, "data.eval_limit": 12, "train.eval_every": 0}},
}


def build(out: Path, size: str) -> Path:
    """The image toy's config (built once); the tiny size shrinks its training steps."""
    from modalities.image_tokens import toy

    config = out / "config.yaml"
    if config.exists():
        return config
    tiny = {"VQ_STEPS": 2, "JUDGE_STEPS": 2, "TEACHER_STEPS": 2, "STUDENT_STEPS": 2, "TRAIN_PICTURES": 64,
            "EVAL_PER_CLASS": 2}  # the plumbing only; restored on return
    with mock.patch.multiple(toy, **tiny) if size == "tiny" else contextlib.nullcontext():
        return toy.build_toy(out, progress=False)


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Distil from the teacher at each CFG scale; write results_cfg_distill.png, .json and .md."""
    from mmopd.config import load_config

    cfg = SIZES[size]
    out = out / NAME
    config_path = build(out / "image_toy", size)
    base = load_config(config_path).to_dict()
    flat = {f"{section}.{key}": value for section, fields in base.items() if isinstance(fields, dict)
            for key, value in fields.items()}
    flat = {**flat, "modality": base["modality"], "train.progress": False, "train.report_to": []}
    rows: dict[str, dict[str, Any]] = {}
    for scale in cfg["scales"]:
        run_dir = run_config(out / "runs" / f"cfg{scale:g}", {**flat, **cfg["overrides"], "teacher.cfg_scale": scale})
        rows[f"{scale:g}"] = json.loads((run_dir / "summary.json").read_text())["pictures"]
    result = {"scales": rows, "eval_pictures": next(iter(rows.values()))["eval_pictures"]}
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: per CFG scale, the guided teacher and the unguided student distilled from it."""
    rows = result["scales"]
    first = next(iter(rows.values()))
    lines = ["| model | judge accuracy | toy FID ↓ | pictures/s (1 CPU thread) | speed vs the guided teacher |",
             "|---|---|---|---|---|",
             f"| teacher, unguided (CFG 1) | {first['classifier_accuracy']['teacher_unguided']:.3f} | "
             f"{first['fid']['teacher_unguided']:.1f} | {first['pictures_per_s']['teacher_unguided']:.0f} | — |",
             f"| student before | {first['classifier_accuracy']['student_before']:.3f} | "
             f"{first['fid']['student_before']:.1f} | — | — |"]
    for scale, r in sorted(rows.items(), key=lambda kv: float(kv[0])):
        lines.append(f"| teacher, CFG {scale} | {r['classifier_accuracy']['teacher']:.3f} | {r['fid']['teacher']:.1f} | "
                     f"{r['pictures_per_s']['teacher']:.0f} | 1× |")
        lines.append(f"| student after OPD from CFG {scale}, unguided | {r['classifier_accuracy']['student_after']:.3f} | "
                     f"{r['fid']['student_after']:.1f} | {r['pictures_per_s']['student_after']:.0f} | "
                     f"{r['student_speedup_over_guided_teacher']:.1f}× |")
    lines.append(f"\n{result['eval_pictures']} eval pictures, temperature 1, one seed per scale; pictures/s is the "
                 "best of 3 timed batches on a shared CPU.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Judge accuracy and toy FID against CFG scale: guided teacher, and the unguided student distilled from it."""
    rows = sorted(result["scales"].items(), key=lambda kv: float(kv[0]))
    scales = [float(s) for s, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "classifier_accuracy", "judge accuracy"), (axes[1], "fid", "toy FID (lower is better)")):
        ax.plot(scales, [r[key]["teacher"] for _, r in rows], "o-", label="teacher with CFG at that scale")
        ax.plot(scales, [r[key]["student_after"] for _, r in rows], "s-", label="student distilled from it, no CFG")
        first = rows[0][1]
        ax.axhline(first[key]["teacher_unguided"], color="grey", linestyle="--", label="teacher, no CFG")
        ax.axhline(first[key]["student_before"], color="grey", linestyle=":", label="student before")
        ax.set_xlabel("teacher CFG scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CFG distillation, image-token toy ({result['eval_pictures']} eval pictures, one seed per scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
