"""Self-distillation with privileged context (OPSD) against plain self-distillation, text toy.

    python -m experiments privileged_teacher [--out DIR] [--size tiny|full] [--publish]

M0 is the toy's student SFT'd on two-digit addition (FIT steps of 64), half of its examples with the answer written
before the problem (`teacher_prompt`: answer, ';', prompt), so that it can copy an answer it is shown and, worse,
add. Every run starts from M0 and is its own teacher (teacher.path = student.path), on 2,000 training problems, for
STEPS steps of 32 prompts at lr 1e-3: `privileged` gives the teacher each record's answer in its prompt,
`plain` does not (its teacher is the student, so the reverse KL and its gradient are 0). Every EVERY steps: greedy
accuracy on 200 held-out problems, which the student reads without the answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import mmopd  # noqa: E402
from experiments.text_task import mean_std, save_results  # noqa: E402
from mmopd.config import load_config  # noqa: E402
from modalities.text import toy  # noqa: E402

NAME = "privileged_teacher"
SIZES: dict[str, dict[str, Any]] = {
    "full": {"fit": 120, "problems": 2000, "eval": 200, "steps": 300, "every": 25, "batch_size": 32,
             "seeds": (0, 1, 2)},
    "tiny": {"fit": 2, "problems": 16, "eval": 4, "steps": 2, "every": 1, "batch_size": 4, "seeds": (0,)},
}
LABELS = {"privileged": "self-distillation, the answer in the teacher's prompt (OPSD)",
          "plain": "plain self-distillation (the same prompt for both)"}


def with_answer(record: dict) -> dict:
    """The record with its privileged prompt: the answer, then the problem."""
    return {**record, "teacher_prompt": f"{record['answer']};{record['prompt']}"}


def build_m0(out: Path, size: str) -> dict[str, str]:
    """M0 (the student SFT'd on problems with and without the answer shown), the training records with and
    without teacher prompts, and the held-out eval records; built once per out dir."""
    s, root = SIZES[size], out / NAME
    paths = {"m0": root / "m0", "privileged": root / "train_privileged.jsonl", "plain": root / "train_plain.jsonl",
             "eval": root / "eval.jsonl"}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    m0 = toy.build_model(tokenizer, "student")
    fitted = toy.make_records(2000, seed=1, digits=2)
    shown = [{"prompt": r["teacher_prompt"], "answer": r["answer"]} for r in map(with_answer, fitted[::2])]
    toy.fit(m0, tokenizer, fitted[1::2] + shown, s["fit"], 3e-3, 64, 0, warmup=10)
    m0.save_pretrained(paths["m0"])
    tokenizer.save_pretrained(paths["m0"])
    train = toy.make_records(s["problems"], seed=11, digits=2)
    seen = {r["prompt"] for r in train}
    held = [r for r in toy.make_records(4 * s["eval"], seed=12, digits=2) if r["prompt"] not in seen][:s["eval"]]
    toy.write_jsonl(paths["privileged"], [with_answer(r) for r in train])
    toy.write_jsonl(paths["plain"], train)
    toy.write_jsonl(paths["eval"], [with_answer(r) for r in held])  # the teacher's privileged eval beside its own
    return {k: str(v) for k, v in paths.items()}


def train_run(out_dir: Path, paths: dict[str, str], method: str, seed: int, size: str) -> dict[str, Any]:
    """One run (cached by its summary.json): its summary and eval accuracy by step."""
    s = SIZES[size]
    if not (out_dir / "summary.json").exists():
        mmopd.train(load_config(None, {
            "modality": "text", "student.path": paths["m0"], "teacher.path": paths["m0"],
            "data.train": paths[method], "data.eval": paths["eval"], "rollout.max_new_tokens": 12,
            "train.steps": s["steps"], "train.batch_size": s["batch_size"], "train.lr": 1e-3, "train.warmup": 0,
            "train.eval_every": s["every"], "train.save_every": 0, "train.eval_batch_size": 200,
            "train.eval_kl_prompts": 0, "train.progress": False, "train.seed": seed, "train.resume": "never",
            "train.out_dir": str(out_dir)}))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    grads = [r["grad_norm"] for r in rows if "loss" in r]
    return {"summary": json.loads((out_dir / "summary.json").read_text()), "steps": sorted(evals),
            "accuracy": [evals[k] for k in sorted(evals)], "max_grad_norm": max(grads)}


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Both methods for every seed; write results_privileged_teacher.png, .json and .md."""
    paths = build_m0(out, size)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LABELS}
    for seed in SIZES[size]["seeds"]:  # the results are written after every seed: a cut-short run keeps its seeds
        for name in LABELS:
            runs[name].append(train_run(out / NAME / "runs" / name / f"seed{seed}", paths, name, seed, size))
        result = summarize(runs, size)
        plot(result, out / f"results_{NAME}.png")
        save_results(out, NAME, result, table(result), root)
    return result


def summarize(runs: dict[str, list[dict[str, Any]]], size: str) -> dict[str, Any]:
    """M0's accuracy with and without the answer shown, and per method the final accuracy and largest gradient."""
    first = runs["privileged"][0]["summary"]
    return {"m0": first["student_before"], "m0_shown_the_answer": first["teacher_privileged"],
            "steps": SIZES[size]["steps"], "batch_size": SIZES[size]["batch_size"], "seeds": len(runs["privileged"]),
            "curves": {name: [{"steps": r["steps"], "accuracy": r["accuracy"]} for r in rs]
                       for name, rs in runs.items()},
            "methods": {name: {"accuracy_final": [r["summary"]["student_after"] for r in rs],
                               "max_grad_norm": [r["max_grad_norm"] for r in rs]} for name, rs in runs.items()}}


def table(result: dict[str, Any]) -> str:
    """Markdown: each method's held-out accuracy after the run and its largest gradient norm."""
    lines = [f"| method | held-out accuracy after {result['steps']} steps | largest gradient norm |", "|---|---|---|"]
    for name, r in result["methods"].items():
        lines.append(f"| {LABELS[name]} | {mean_std(r['accuracy_final'])} | {mean_std(r['max_grad_norm'], '.3g')} |")
    lines.append(f"\nM0 held-out accuracy {result['m0']:.3f} on the plain prompts, {result['m0_shown_the_answer']:.3f} "
                 f"shown the answer (greedy exact match); mean ± std over {result['seeds']} seeds.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out accuracy against steps, mean ± std band over seeds, with M0 shown the answer for reference."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cs in result["curves"].items():
        steps, ys = np.array(cs[0]["steps"]), np.array([c["accuracy"] for c in cs])
        line, = ax.plot(steps, ys.mean(0), label=LABELS[name])
        ax.fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(), alpha=0.2)
    ax.axhline(result["m0_shown_the_answer"], color="black", linestyle="--", label="M0 shown the answer (teacher)")
    ax.set_xlabel(f"training step ({result['batch_size']} prompts each)")
    ax.set_ylabel("held-out accuracy (exact match, greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    ax.set_title(f"Self-distillation with privileged context, text toy; {result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
