"""Forgetting: SFT on task B erodes task A; on-policy distillation from the task-A model brings A back.

    python -m experiments forgetting [--out DIR] [--size tiny|full] [--publish]

Task A is the text toy (3-digit addition with column sums); task B reverses a 5-digit number
(`34758=` -> `#85743`), in the same character vocabulary. Stage 1: the task-A model is the toy's teacher
(trained on A only). Stage 2, two scenarios: SFT on B only (total forgetting of A), or on B with 15% of
the examples from A (a mid-training mix that keeps some old data: A drops partly). Stage 3, from each
stage-2 model, four ways at the same steps and batch: on_policy reverse KL to the stage-1 model on A
prompts only, at the toy's lr and at a tenth of it (does a gentler update keep B?); on_policy on a 50/50
mix of A and B prompts with the dataset answers' NLL added (`sft_weight: 1`, so B keeps a signal the A
teacher cannot give); and SFT on the same 50/50 mix (rehearsal, the usual fix). A and B accuracy (greedy
exact match of the final answer, 200 held-out prompts each) is measured on checkpoints through stages
2 and 3.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

import mmopd  # noqa: E402
from experiments.text_task import SIZES as TEXT_SIZES  # noqa: E402
from experiments.text_task import build_task, mean_std, save_results  # noqa: E402
from mmopd.config import load_config  # noqa: E402
from modalities.text import toy  # noqa: E402

NAME = "forgetting"
SIZES: dict[str, dict[str, Any]] = {
    "full": {"b_records": 5000, "eval": 200, "sft_steps": 150, "stage3_steps": 200, "every": 25, "seeds": (0, 1, 2)},
    "tiny": {"b_records": 16, "eval": 4, "sft_steps": 2, "stage3_steps": 2, "every": 1, "seeds": (0,)},
}
# stage 2: name -> (the label, the train file, the stage-2 run dir, the stage-3 runs' dir)
SCENARIOS: dict[str, tuple[str, str, str, str]] = {
    "total": ("SFT on B", "b", "stage2_sft_b", "stage3"),
    "partial": ("SFT on 85% B + 15% A", "b_a15", "stage2_sft_b_a15", "stage3_partial"),
}
A_SHARE = 0.15  # the partial scenario's share of A examples in stage 2
STAGE3: dict[str, dict[str, Any]] = {
    "OPD on A prompts": {"objective.kind": "on_policy", "data": "a"},
    "OPD on A prompts, lr 2e-4": {"objective.kind": "on_policy", "data": "a", "train.lr": 2e-4},
    "OPD on A+B prompts, + NLL on answers": {"objective.kind": "on_policy", "objective.sft_weight": 1.0,
                                             "data": "mix"},
    "SFT on A+B (rehearsal)": {"objective.kind": "sft", "data": "mix"},
}


def reverse_records(n: int, seed: int) -> list[dict]:
    """Task B: reverse a 5-digit number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = str(rng.randint(10000, 99999))
        out.append({"prompt": f"{digits}=", "answer": toy.FINAL_MARKER + digits[::-1]})
    return out


def data(out: Path, task: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Train files for B and for the A+B mix, and the A and B eval records."""
    a_train = [json.loads(line) for line in Path(task["paths"]["train"]).read_text().splitlines()]
    b_train = reverse_records(cfg["b_records"], seed=10)
    seen = {r["prompt"] for r in b_train}
    b_eval = [r for r in reverse_records(4 * cfg["eval"], seed=11) if r["prompt"] not in seen][:cfg["eval"]]
    a_eval = [json.loads(line) for line in Path(task["paths"]["eval"]).read_text().splitlines()][:cfg["eval"]]
    mix = a_train[:len(b_train)] + b_train
    random.Random(12).shuffle(mix)
    b_a15 = a_train[-max(int(len(b_train) * A_SHARE / (1 - A_SHARE)), 1):] + b_train  # A's last, unlike mix
    random.Random(13).shuffle(b_a15)
    paths = {"b": out / "data" / "b_train.jsonl", "mix": out / "data" / "mix_train.jsonl",
             "b_a15": out / "data" / "b_a15_train.jsonl", "a": Path(task["paths"]["train"])}
    toy.write_jsonl(paths["b"], b_train)
    toy.write_jsonl(paths["mix"], mix)
    toy.write_jsonl(paths["b_a15"], b_a15)
    return {"paths": paths, "a_eval": a_eval, "b_eval": b_eval}


def accuracies(model_dir: Path | str, d: dict[str, Any]) -> tuple[float, float]:
    """Greedy accuracy on task A and task B."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    return (toy.greedy_accuracy(model, tokenizer, d["a_eval"], toy.MAX_NEW_TOKENS),
            toy.greedy_accuracy(model, tokenizer, d["b_eval"], toy.MAX_NEW_TOKENS))


def stage(out_dir: Path, overrides: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    """Train one stage, measure A and B on every checkpoint, keep only the final model; cached by curve.json."""
    done = out_dir / "curve.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    summary = mmopd.train(load_config(None, {**overrides, "train.out_dir": str(out_dir), "train.resume": "never"}))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    curve: dict[str, Any] = {"steps": [], "a": [], "b": [],
                             "seconds": sum(r["time/step"] for r in rows if "time/step" in r)}
    for ckpt in sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        a, b = accuracies(ckpt / "model", d)
        curve["steps"].append(int(ckpt.name.split("-")[1]))
        curve["a"].append(a)
        curve["b"].append(b)
    shutil.move(out_dir / "checkpoints" / f"step-{summary['steps']}" / "model", out_dir / "final")
    shutil.rmtree(out_dir / "checkpoints")
    done.write_text(json.dumps(curve))
    return curve


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Stage 2 once, stage 3 per variant and seed; write results_forgetting.png, .json and .md."""
    cfg, text = SIZES[size], TEXT_SIZES[size]
    task = build_task(out, size)
    out = out / NAME
    d = data(out, task, cfg)
    teacher = task["paths"]["teacher"]
    common = {"modality": "text", "teacher.path": teacher, "data.eval": "", "rollout.max_new_tokens":
              toy.MAX_NEW_TOKENS, "train.batch_size": text["batch_size"], "train.lr": text["lr"],
              "train.warmup": text["warmup"] // 5, "train.save_every": cfg["every"], "train.progress": False}
    start = accuracies(teacher, d)
    scenarios: dict[str, dict[str, Any]] = {}
    for scenario, (label, data_key, stage2_dir, stage3_dir) in SCENARIOS.items():
        sft = stage(out / stage2_dir, {**common, "student.path": teacher, "data.train": str(d["paths"][data_key]),
                                       "objective.kind": "sft", "train.steps": cfg["sft_steps"]}, d)
        stage3: dict[str, list[dict[str, Any]]] = {}
        for seed in cfg["seeds"]:
            for name, spec in STAGE3.items():
                overrides = {k: v for k, v in spec.items() if k != "data"}
                slug = name.split()[0].lower() + "_" + spec["data"] + ("_nll" if "objective.sft_weight" in spec else "") \
                    + (f"_lr{spec['train.lr']:g}" if "train.lr" in spec else "")
                stage3.setdefault(name, []).append(stage(
                    out / stage3_dir / slug / f"seed{seed}",
                    {**common, **overrides, "student.path": str(out / stage2_dir / "final"),
                     "data.train": str(d["paths"][spec["data"]]), "train.steps": cfg["stage3_steps"],
                     "train.seed": seed}, d))
        scenarios[scenario] = {"label": label, "stage2": sft, "stage3": stage3}
    result = {"stage1": {"a": start[0], "b": start[1]}, "scenarios": scenarios, "seeds": len(cfg["seeds"]),
              "eval": cfg["eval"]}
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"results_{NAME}.png")
    save_results(out, NAME, result, table(result), root)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: A and B accuracy after each stage of each scenario (stage 3: mean ± std over seeds), and
    training seconds."""
    s1 = result["stage1"]
    lines = ["| stage | task A accuracy | task B accuracy | train s |", "|---|---|---|---|",
             f"| 1. task-A model (the toy teacher) | {s1['a']:.3f} | {s1['b']:.3f} | — |"]
    for scenario in result["scenarios"].values():
        s2 = scenario["stage2"]
        lines.append(f"| **2. + {scenario['label']}, {s2['steps'][-1]} steps** | {s2['a'][-1]:.3f} | "
                     f"{s2['b'][-1]:.3f} | {s2['seconds']:.0f} |")
        for name, curves in scenario["stage3"].items():
            lines.append(f"| 3. {name}, {curves[0]['steps'][-1]} steps | {mean_std([c['a'][-1] for c in curves])} | "
                         f"{mean_std([c['b'][-1] for c in curves])} | {np.mean([c['seconds'] for c in curves]):.0f} |")
    lines.append(f"\nGreedy exact match on {result['eval']} held-out prompts per task; stage 3 mean ± std over "
                 f"{result['seeds']} seeds, each from the stage-2 model above it.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Per scenario, A (solid) and B (dashed) accuracy against cumulative steps through stages 2 and 3, band
    over seeds."""
    scenarios = list(result["scenarios"].values())
    fig, axes = plt.subplots(1, len(scenarios), figsize=(8 * len(scenarios), 4.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        s2 = scenario["stage2"]
        x2 = [0] + s2["steps"]
        ax.plot(x2, [result["stage1"]["a"]] + s2["a"], color="black", label="task A, stage 2")
        ax.plot(x2, [result["stage1"]["b"]] + s2["b"], color="black", linestyle="--", label="task B, stage 2")
        offset = s2["steps"][-1]
        for i, (name, curves) in enumerate(scenario["stage3"].items()):
            x = offset + np.array([0] + curves[0]["steps"])
            for key, style in (("a", "-"), ("b", "--")):
                ys = np.array([[s2[key][-1]] + c[key] for c in curves])  # [seeds, points]
                ax.plot(x, ys.mean(0), color=f"C{i}", linestyle=style, label=f"task {key.upper()}, 3: {name}")
                ax.fill_between(x, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=f"C{i}", alpha=0.15)
        ax.axvline(offset, color="grey", linestyle=":")
        ax.text(offset / 2, 1.02, f"stage 2: {scenario['label']}", ha="center", fontsize=8)
        ax.text(offset * 1.6, 1.02, "stage 3 (from the stage-2 model)", ha="center", fontsize=8)
        ax.set_xlabel("training step (64 examples each; stage 1 = step 0)")
        ax.set_ylabel("accuracy (greedy exact match)")
        ax.set_ylim(-0.02, 1.08)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle(f"Forgetting and recovery: A = addition, B = reversal; bands: std over {result['seeds']} seeds",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
