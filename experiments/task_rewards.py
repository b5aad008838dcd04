"""Task rewards beside the teacher: OPD, OPD plus the exact-match reward, and the reward alone, text toy.

    python -m experiments task_rewards [--out DIR] [--size tiny|full] [--publish]

Every run starts from the text toy's student and trains on the toy's training problems for 400 steps of 32 prompts
with 2 samples each (the same 64 sequences a step for every method), lr 2e-3 after 50 warmup steps, cosine to 0,
sampling at temperature 1: `opd` is on-policy full reverse KL against a teacher (`objective.reward_weight` 0);
`opd_reward` adds the `exact_match` reward (`reward_weight` 1, `kl_weight` 1, the prompt's group mean as baseline);
`reward` is the reward alone (`kl_weight` 0, no teacher: plain on-policy RL). The teachers: the toy's own (`right`),
and `wrong`: the toy's teacher SFT'd for 100 more steps of 64 on the training answers with the final answer's last
digit written 8 where the sum ends in 7 (the subset, a tenth of the problems), so that it is wrong on the subset and
right elsewhere. `opd` and `opd_reward` run against both teachers, and `opd_reward` at reward weight 10 against the
wrong one. Every 50 steps: greedy accuracy on 200 held-out problems whose sum ends in 7 and 200 others.
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
import torch  # noqa: E402
import transformers  # noqa: E402

from experiments.text_task import base_overrides, build_task, checkpointed_run, mean_std, save_results  # noqa: E402
from modalities.text import toy  # noqa: E402

NAME = "task_rewards"
SIZES: dict[str, dict[str, Any]] = {
    "full": {"teacher_fit": 100, "steps": 400, "every": 50, "batch_size": 32, "samples": 2, "lr": 2e-3,
             "warmup": 50, "eval": 200, "max_new_tokens": 16, "seeds": (0, 1, 2)},
    "tiny": {"teacher_fit": 2, "steps": 2, "every": 1, "batch_size": 2, "samples": 2, "lr": 1e-3, "warmup": 0,
             "eval": 4, "max_new_tokens": 6, "seeds": (0,)},
}
REWARD_WEIGHT, STRONG = 1.0, 10.0  # the reward's weight beside a KL weight of 1, and a stronger one
WRONG_DIGIT = "8"  # what the wrong teacher writes for a sum's last digit 7
# arm -> (method, teacher, reward weight); the reward alone has no teacher
ARMS: dict[str, tuple[str, str | None, float]] = {
    "opd": ("opd", "right", 0.0), "opd_reward": ("opd_reward", "right", REWARD_WEIGHT),
    "reward": ("reward", None, REWARD_WEIGHT), "opd_wrong": ("opd", "wrong", 0.0),
    "opd_reward_wrong": ("opd_reward", "wrong", REWARD_WEIGHT),
    "opd_strong_reward_wrong": ("opd_reward", "wrong", STRONG)}
LABELS = {"opd": "OPD, right teacher", "opd_reward": "OPD + reward, right teacher",
          "reward": "reward only (no teacher)",
          "opd_wrong": "OPD, wrong teacher", "opd_reward_wrong": "OPD + reward, wrong teacher",
          "opd_strong_reward_wrong": f"OPD + reward ×{STRONG:g}, wrong teacher"}
SPLITS = ("subset", "rest")  # held-out problems whose sum ends in 7, and the others


def on_subset(record: dict) -> bool:
    """Whether the problem's sum ends in 7 (where the wrong teacher is taught to be wrong)."""
    return toy.final_answer(record["answer"]).endswith("7")


def mislabel(record: dict) -> dict:
    """The record with its final answer's last digit written WRONG_DIGIT where the sum ends in 7 (its reasoning
    steps, the column sums, stay right); any other record as it is."""
    return {**record, "answer": record["answer"][:-1] + WRONG_DIGIT} if on_subset(record) else record


def objective(method: str, weight: float) -> dict[str, Any]:
    """A method's objective overrides: pure OPD, OPD plus the reward at this weight, or the reward alone."""
    reward = {"objective.reward": "exact_match", "objective.reward_weight": weight}
    return {"opd": {"objective.reward_weight": 0.0}, "opd_reward": {**reward, "objective.kl_weight": 1.0},
            "reward": {**reward, "objective.kl_weight": 0.0, "teacher.path": ""}}[method]


def held_out(task: dict[str, Any], n: int) -> dict[str, list[dict]]:
    """n held-out problems of each split, none of them in the training records."""
    seen = {json.loads(line)["prompt"] for line in Path(task["paths"]["train"]).read_text().splitlines()}
    pool = [r for r in toy.make_records(40 * n, seed=7) if r["prompt"] not in seen]
    return {"subset": [r for r in pool if on_subset(r)][:n], "rest": [r for r in pool if not on_subset(r)][:n]}


def accuracies(path: str | Path, tokenizer: Any, evals: dict[str, list[dict]], max_new_tokens: int) -> dict:
    """Greedy accuracy of the model at path on each split."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return {split: toy.greedy_accuracy(model, tokenizer, records, max_new_tokens) for split, records in evals.items()}


def build_teachers(out: Path, task: dict[str, Any], size: str) -> dict[str, Any]:
    """The wrong teacher (built once per out dir), the held-out splits, and the accuracy on each split of the
    student and of both teachers."""
    s, root = SIZES[size], out / NAME
    info_path = root / "teachers.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    p = task["paths"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(p["teacher"])
    train = [json.loads(line) for line in Path(p["train"]).read_text().splitlines()]
    torch.manual_seed(0)
    wrong = transformers.AutoModelForCausalLM.from_pretrained(p["teacher"])
    toy.fit(wrong, tokenizer, [mislabel(r) for r in train], s["teacher_fit"], 1e-3, 64, 0, warmup=10)
    wrong.save_pretrained(root / "wrong_teacher")
    tokenizer.save_pretrained(root / "wrong_teacher")
    evals = held_out(task, s["eval"])
    for split, records in evals.items():
        toy.write_jsonl(root / f"eval_{split}.jsonl", records)
    paths = {"right": p["teacher"], "wrong": str(root / "wrong_teacher")}
    info = {"paths": paths, "evals": {split: str(root / f"eval_{split}.jsonl") for split in SPLITS},
            "subset_share_train": float(np.mean([on_subset(r) for r in train])),
            "accuracy": {name: accuracies(path, tokenizer, evals, s["max_new_tokens"])
                         for name, path in {"student": p["student"], **paths}.items()}}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def train_run(out_dir: Path, task: dict[str, Any], teachers: dict[str, Any], arm: str, seed: int,
              size: str) -> dict[str, Any]:
    """One run, cached by its curve.json: held-out accuracy per split at every EVERY steps (step 0: the
    student), from the run's checkpoints (removed after), and the training reward and time per step."""
    if (out_dir / "curve.json").exists():
        return json.loads((out_dir / "curve.json").read_text())
    s, (method, teacher, weight) = SIZES[size], ARMS[arm]
    overrides = {**base_overrides(task, size), "data.eval": "", "teacher.path": teachers["paths"].get(teacher, ""),
                 "rollout.max_new_tokens": s["max_new_tokens"], "rollout.samples_per_prompt": s["samples"],
                 "train.batch_size": s["batch_size"], "train.lr": s["lr"], "train.warmup": s["warmup"],
                 "train.steps": s["steps"], "train.seed": seed, **objective(method, weight)}
    checkpointed_run(out_dir, overrides, s["every"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(task["paths"]["student"])
    evals = {split: [json.loads(line) for line in Path(path).read_text().splitlines()]
             for split, path in teachers["evals"].items()}
    steps = list(range(s["every"], s["steps"] + 1, s["every"]))
    points = [teachers["accuracy"]["student"]] + [
        accuracies(out_dir / "checkpoints" / f"step-{k}" / "model", tokenizer, evals, s["max_new_tokens"])
        for k in steps]
    shutil.rmtree(out_dir / "checkpoints")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    result = {"steps": [0] + steps, **{split: [pt[split] for pt in points] for split in SPLITS},
              "reward_mean": [r.get("reward/mean") for r in trained],
              "train_seconds": float(sum(r["time/step"] for r in trained))}
    (out_dir / "curve.json").write_text(json.dumps(result))
    return result


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Every arm for every seed; write results_task_rewards.png, .json and .md after every seed."""
    task = build_task(out, size)
    teachers = build_teachers(out, task, size)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in SIZES[size]["seeds"]:  # the results are written after every seed: a cut-short run keeps its seeds
        for arm in ARMS:
            runs[arm].append(train_run(out / NAME / "runs" / arm / f"seed{seed}", task, teachers, arm, seed, size))
        result = summarize(runs, teachers, size)
        plot(result, out / f"results_{NAME}.png")
        save_results(out, NAME, result, table(result), root)
    return result


def summarize(runs: dict[str, list[dict[str, Any]]], teachers: dict[str, Any], size: str) -> dict[str, Any]:
    """The settings, the start and teachers' accuracies, and per arm each seed's final accuracy on each split,
    its mean training reward over the last quarter of the steps, and its curve."""
    s = SIZES[size]
    quarter = max(s["steps"] // 4, 1)
    arms = {}
    for arm, rs in runs.items():
        rewards = [[x for x in r["reward_mean"][-quarter:] if x is not None] for r in rs]
        arms[arm] = {"method": ARMS[arm][0], "teacher": ARMS[arm][1], "reward_weight": ARMS[arm][2],
                     **{f"{split}_final": [r[split][-1] for r in rs] for split in SPLITS},
                     "train_reward_last_quarter": [float(np.mean(x)) if x else None for x in rewards],
                     "train_seconds": [r["train_seconds"] for r in rs]}
    return {"steps": s["steps"], "batch_size": s["batch_size"], "samples_per_prompt": s["samples"], "lr": s["lr"],
            "warmup": s["warmup"], "reward_weights": [REWARD_WEIGHT, STRONG], "teacher_fit_steps": s["teacher_fit"],
            "eval_per_split": s["eval"], "subset_share_train": teachers["subset_share_train"],
            "accuracy": teachers["accuracy"], "seeds": len(runs["opd"]), "arms": arms,
            "curves": {arm: [{k: r[k] for k in ("steps", *SPLITS)} for r in rs] for arm, rs in runs.items()}}


def table(result: dict[str, Any]) -> str:
    """Markdown: the start and the teachers, then each arm's held-out accuracy on and off the subset."""
    acc = result["accuracy"]
    lines = ["| model | held-out accuracy, sums ending in 7 | the other sums | training reward (last quarter) |",
             "|---|---|---|---|"]
    for name, what in (("student", "start: the toy's student"), ("right", "right teacher (the toy's)"),
                       ("wrong", "wrong teacher (wrong where the sum ends in 7)")):
        lines.append(f"| {what} | {acc[name]['subset']:.3f} | {acc[name]['rest']:.3f} | |")
    for arm, r in result["arms"].items():
        rewards = [x for x in r["train_reward_last_quarter"] if x is not None]
        lines.append(f"| {LABELS[arm]}, {result['steps']} steps | {mean_std(r['subset_final'])} | "
                     f"{mean_std(r['rest_final'])} | {mean_std(rewards) if rewards else '— (not logged)'} |")
    lines.append(f"\nGreedy exact match on {result['eval_per_split']} held-out problems per column; mean ± std over "
                 f"{result['seeds']} seeds. Each step: {result['batch_size']} prompts × {result['samples_per_prompt']}"
                 f" samples, lr {result['lr']:g} after {result['warmup']} warmup steps; reward weight "
                 f"{result['reward_weights'][0]:g} unless marked, KL weight 1 (0 for the reward alone). Training "
                 "reward: the mean exact-match reward of the training samples (temperature 1), logged where the "
                 "reward is on (not for OPD alone).")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out accuracy against steps on the subset (left) and off it (right), mean ± std band over seeds, with
    both teachers' accuracies for reference."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    styles = {"right": "-", None: ":", "wrong": "--"}
    colors = {"opd": "C0", "opd_reward": "C3", "reward": "C2"}
    for ax, split, title in zip(axes, SPLITS, ("sums ending in 7 (the wrong teacher's subset)", "the other sums")):
        for arm, cs in result["curves"].items():
            method, teacher, weight = ARMS[arm]
            steps, ys = np.array(cs[0]["steps"]), np.array([c[split] for c in cs])
            color = "C1" if weight == STRONG else colors[method]
            ax.plot(steps, ys.mean(0), color=color, linestyle=styles[teacher], label=LABELS[arm])
            ax.fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.12)
        for name, color in (("right", "black"), ("wrong", "grey")):
            ax.axhline(result["accuracy"][name][split], color=color, linewidth=0.8, linestyle="-.",
                       label=f"{name} teacher")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"training step ({result['batch_size']} prompts × {result['samples_per_prompt']} samples)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (exact match, greedy)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Task rewards beside the teacher, text toy; mean ± std over {result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
