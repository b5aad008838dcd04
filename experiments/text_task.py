"""The text toy the text experiments share (built once per output dir), one cached training run per
(method, seed), and a run's learning curve against compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import transformers

import mmopd
from mmopd.config import load_config
from modalities.text import toy

# Measured settings for the full size: on_policy reaches ~0.87 in 200 steps of 64 prompts at lr 2e-3.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"batch_size": 64, "lr": 2.0e-3, "warmup": 50, "eval_limit": 200, "max_new_tokens": toy.MAX_NEW_TOKENS,
             "seeds": (0, 1, 2), "scale": 1.0},
    "tiny": {"batch_size": 4, "lr": 1.0e-3, "warmup": 0, "eval_limit": 4, "max_new_tokens": 6,
             "seeds": (0,), "scale": 0.0},
}


def build_task(out: Path, size: str) -> dict[str, Any]:
    """Data, teacher and student paths with their accuracies and sizes; built once per out dir and reused."""
    info_path = out / "task.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    root = out / "toy"
    ready = {"teacher": root / "teacher", "student": root / "student", "train": root / "data" / "train.jsonl",
             "eval": root / "data" / "eval.jsonl"}
    if size == "full" and all(p.exists() for p in ready.values()) and (root / "student" / "tokenizer.json").exists():
        paths, seconds = {k: str(v) for k, v in ready.items()}, None  # a toy built earlier (`mmopd toy text`)
    elif size == "full":
        built = toy.build_toy(root, seed=0, progress=False)
        paths, seconds = built["paths"], built["seconds"]
    else:  # random tiny models: only the plumbing is tested
        paths = {k: str(v) for k, v in toy.build_untrained(root).items()}
        seconds = 0.0
    params = {role: sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(paths[role]).parameters())
              for role in ("teacher", "student")}
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["student"])
    prompts = [json.loads(line)["prompt"] for line in Path(paths["train"]).read_text().splitlines()[:256]]
    prompt_tokens = float(np.mean([len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]))
    info = {"size": size, "paths": paths, "params": params, "prompt_tokens": prompt_tokens,
            "build_seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=1))
    return info


def base_overrides(task: dict[str, Any], size: str) -> dict[str, Any]:
    """The settings every text run shares: same student start, batch, lr, schedule and eval."""
    s = SIZES[size]
    p = task["paths"]
    return {"modality": "text", "student.path": p["student"], "teacher.path": p["teacher"],
            "data.train": p["train"], "data.eval": p["eval"], "data.eval_limit": s["eval_limit"],
            "rollout.max_new_tokens": s["max_new_tokens"], "train.batch_size": s["batch_size"],
            "train.lr": s["lr"], "train.warmup": s["warmup"], "train.save_every": 0, "train.eval_batch_size": 200,
            "train.progress": False}


def run_config(out_dir: Path, overrides: dict[str, Any]) -> Path:
    """Train with these overrides into out_dir unless a finished run (summary.json) is already there; keep
    only the final student (out_dir/final) of its checkpoints."""
    if (out_dir / "summary.json").exists():
        return out_dir
    if out_dir.exists():  # an unfinished run: start over, so that timings are of one uninterrupted process
        shutil.rmtree(out_dir)
    summary = mmopd.train(load_config(None, {**overrides, "train.out_dir": str(out_dir), "train.resume": "never"}))
    shutil.move(out_dir / "checkpoints" / f"step-{summary['steps']}" / "model", out_dir / "final")
    shutil.rmtree(out_dir / "checkpoints")
    return out_dir


def checkpointed_run(out_dir: Path, overrides: dict[str, Any], every: int) -> tuple[dict[str, Any], dict[int, float]]:
    """Train into out_dir from scratch (an unfinished run there is removed) with a checkpoint and an eval every
    `every` steps; the summary and the eval accuracy by step, step 0 included."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    summary = mmopd.train(load_config(None, {**overrides, "train.out_dir": str(out_dir), "train.resume": "never",
                                             "train.save_every": every, "train.eval_every": every}))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}


def step_flops(row: dict[str, Any], kind: str, task: dict[str, Any], batch_size: int) -> float:
    """Estimated FLOPs of one step: 2·N per token for a forward pass (generation included), 4·N more for the
    backward of what the student trains.

    Tokens are the step's prompts plus its response tokens; attention FLOPs are left out (under 5% at
    these lengths and widths). N counts the language model; a VLM task adds its vision tower's forward per
    prompt (`vision_flops`), and a CFG-guided teacher runs `teacher_rows` = 2 rows per token. Generation:
    the student's when the step was on-policy, the teacher's for seq_kd. Teacher scoring: every kind but
    sft and seq_kd.
    """
    params = task["params"]
    vision = task.get("vision_flops", {})
    rows = task.get("teacher_rows", 1)
    tokens = batch_size * task["prompt_tokens"] + row["response_tokens"]
    student_forward = 2 * params["student"] * tokens + batch_size * vision.get("student", 0.0)
    teacher_forward = rows * (2 * params["teacher"] * tokens + batch_size * vision.get("teacher", 0.0))
    flops = student_forward + 4 * params.get("student_trainable", params["student"]) * tokens
    if row.get("on_policy", 0.0) > 0.5:
        flops += student_forward
    if kind == "seq_kd":
        flops += teacher_forward
    if kind not in ("sft", "seq_kd"):
        flops += teacher_forward
    return flops


def curve(run_dir: Path, task: dict[str, Any]) -> dict[str, Any]:
    """A run's eval accuracy against steps, cumulative FLOPs and cumulative training seconds (eval excluded)."""
    config = load_config(run_dir / "config.yaml")
    sequences = config.train.batch_size * (1 if config.objective.kind in ("sft", "supervised_kd")
                                           else config.rollout.samples_per_prompt)  # each sample reads its prompt
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    flops, seconds, teacher_s = {0: 0.0}, {0: 0.0}, []
    for row in rows:
        if "loss" in row:
            flops[row["step"]] = flops[row["step"] - 1] + step_flops(row, config.objective.kind, task, sequences)
            seconds[row["step"]] = seconds[row["step"] - 1] + row["time/step"]
            teacher_s.append(row.get("time/teacher", 0.0))
    metric = f"eval/{task.get('metric', 'accuracy')}"
    evals = {row["step"]: row[metric] for row in rows if metric in row}
    steps = sorted(evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"steps": steps, "accuracy": [evals[s] for s in steps], "flops": [flops[s] for s in steps],
            "seconds": [seconds[s] for s in steps], "teacher": summary.get("teacher"),
            "student_before": summary.get("student_before"), "teacher_seconds_per_step": float(np.median(teacher_s)),
            "seconds_per_step": seconds[max(seconds)] / max(max(seconds), 1)}


def band(curves: list[dict[str, Any]], axis: str, points: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds of accuracy, interpolated on a common grid of `axis`."""
    end = min(c[axis][-1] for c in curves)
    grid = np.linspace(0.0, end, points)
    ys = np.array([np.interp(grid, c[axis], c["accuracy"]) for c in curves])  # [seeds, points]
    return grid, ys.mean(0), ys.std(0)


def mean_std(values: list[float], fmt: str = ".3f") -> str:
    """'0.873 ± 0.012' over seeds (population std), or the one value."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"


def save_results(out: Path, name: str, result: dict, table: str, root: Path | None) -> None:
    """Write NAME.json and NAME.md (the table) beside results_NAME.png, print the table, and with a root copy
    the plot to docs/images/ and NAME.json/NAME.md to docs/results/ under it."""
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(table)
    print(table)
    if root is None:
        return
    (root / "docs" / "images").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "results").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / f"results_{name}.png", root / "docs" / "images" / f"results_{name}.png")
    for ext in ("json", "md"):
        shutil.copy(out / f"{name}.{ext}", root / "docs" / "results" / f"{name}.{ext}")
