"""Self-distillation drift: SFT on a model's own samples against on-policy distillation from its frozen copy.

    python -m experiments self_distill [--out DIR] [--size tiny|full] [--publish]

The original M0 is the text toy's student (150 SFT steps, broad: accuracy 0.30), and every run starts from
it and is its own teacher, frozen. Three ways to train on M0 for 400 steps of 64 prompts at the toy's lr:
`seq_kd` (NLL on samples M0 draws afresh every step), `sft_fixed` (NLL on one fixed set of 640 M0 samples,
40 epochs: a finite batch of its own samples, as a user would save them) and `on_policy` (full reverse KL
to M0 on the student's samples). Every 50 steps: KL(M0 ‖ student) per sequence on held-out prompts
(Σ over the response of the exact per-token KL, on responses M0 samples, an estimate of the sequence-level
KL), and the task's greedy accuracy.
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

from experiments.text_task import (SIZES, base_overrides, build_task, checkpointed_run, mean_std,  # noqa: E402
                                   save_results)
from modalities.text.adapter import prompt_text  # noqa: E402

NAME = "self_distill"
STEPS = {"full": 400, "tiny": 4}
EVERY = {"full": 50, "tiny": 2}
FIXED = {"full": 640, "tiny": 8}  # sft_fixed's samples of M0
KL_PROMPTS = {"full": 200, "tiny": 4}
METHODS: dict[str, dict[str, Any]] = {
    "seq_kd": {"objective.kind": "seq_kd"},
    "sft_fixed": {"objective.kind": "sft"},
    "on_policy": {"objective.kind": "on_policy", "objective.estimator": "full"},
}
LABELS = {"seq_kd": "SFT on fresh M0 samples (seq_kd)", "sft_fixed": "SFT on a fixed set of M0 samples",
          "on_policy": "OPD against frozen M0 (full reverse KL)"}


def sample(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, seed: int) -> list[list[int]]:
    """Token ids of one response per prompt sampled at temperature 1, up to and with EOS: [[int]]."""
    torch.manual_seed(seed)
    enc = tokenizer([prompt_text(p, tokenizer) for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=not tokenizer.chat_template)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    responses = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        responses.append(row[:end])
    return responses


def sequence_kl(original: Any, model: Any, tokenizer: Any, prompts: list[str], responses: list[list[int]]) -> float:
    """Mean over responses of Σ_t KL(original ‖ model) at each response position (exact per token)."""
    totals = []
    for prompt, response in zip(prompts, responses):
        ids = tokenizer(prompt_text(prompt, tokenizer), add_special_tokens=not tokenizer.chat_template)["input_ids"]
        x = torch.tensor([ids + response])  # [1, L]
        with torch.no_grad():
            logp = torch.log_softmax(original(x).logits[0, len(ids) - 1:-1].float(), -1)  # [T, V]
            logq = torch.log_softmax(model(x).logits[0, len(ids) - 1:-1].float(), -1)
        totals.append(float((logp.exp() * (logp - logq)).sum()))
    return float(np.mean(totals))


def fixed_samples(task: dict[str, Any], size: str, path: Path) -> Path:
    """A JSONL of FIXED training prompts with one M0 sample each as the answer (sft_fixed's data), built once;
    a sample that is only EOS has no answer to train on and is left out."""
    if path.exists():
        return path
    tokenizer = transformers.AutoTokenizer.from_pretrained(task["paths"]["student"])
    model = transformers.AutoModelForCausalLM.from_pretrained(task["paths"]["student"]).eval()
    records = [json.loads(line) for line in Path(task["paths"]["train"]).read_text().splitlines()[:FIXED[size]]]
    responses = sample(model, tokenizer, [r["prompt"] for r in records], SIZES[size]["max_new_tokens"], seed=0)
    answers = [tokenizer.decode(resp, skip_special_tokens=True) for resp in responses]
    lines = [json.dumps({"prompt": r["prompt"], "answer": a}) for r, a in zip(records, answers) if a]  # no empty
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def drift_run(out_dir: Path, overrides: dict[str, Any], task: dict[str, Any], size: str,
              held_out: tuple[list[str], list[list[int]]]) -> dict[str, Any]:
    """Train with checkpoints every EVERY steps, measure each one's KL to M0, keep only the curve (cached)."""
    curve_path = out_dir / "drift.json"
    if curve_path.exists():
        return json.loads(curve_path.read_text())
    every = EVERY[size]
    summary, evals = checkpointed_run(out_dir, overrides, every)
    tokenizer = transformers.AutoTokenizer.from_pretrained(task["paths"]["student"])
    original = transformers.AutoModelForCausalLM.from_pretrained(task["paths"]["student"]).eval()
    steps, kls = [0], [0.0]
    for step in range(every, summary["steps"] + 1, every):
        model = transformers.AutoModelForCausalLM.from_pretrained(out_dir / "checkpoints" / f"step-{step}" / "model")
        steps.append(step)
        kls.append(sequence_kl(original, model.eval(), tokenizer, *held_out))
    curve = {"steps": steps, "kl": kls, "accuracy": [evals[s] for s in steps]}
    shutil.rmtree(out_dir / "checkpoints")
    curve_path.write_text(json.dumps(curve))
    return curve


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Every method for every seed; write results_self_distill.png, .json and .md."""
    task = build_task(out, size)
    p = task["paths"]
    base = {**base_overrides(task, size), "teacher.path": p["student"], "train.steps": STEPS[size]}
    data = fixed_samples(task, size, out / NAME / "m0_samples.jsonl")
    tokenizer = transformers.AutoTokenizer.from_pretrained(p["student"])
    original = transformers.AutoModelForCausalLM.from_pretrained(p["student"]).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(p["eval"]).read_text().splitlines()[:KL_PROMPTS[size]]]
    held_out = (prompts, sample(original, tokenizer, prompts, SIZES[size]["max_new_tokens"], seed=1))
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in METHODS}
    for seed in SIZES[size]["seeds"]:  # the results are written after every seed: a cut-short run keeps its seeds
        for name, overrides in METHODS.items():
            extra = {"data.train": str(data)} if name == "sft_fixed" else {}
            curves[name].append(drift_run(out / NAME / "runs" / name / f"seed{seed}",
                                          {**base, **overrides, **extra, "train.seed": seed}, task, size, held_out))
        result = summarize(curves, size)
        plot(result, out / f"results_{NAME}.png")
        save_results(out, NAME, result, table(result), root)
    return result


def summarize(curves: dict[str, list[dict[str, Any]]], size: str) -> dict[str, Any]:
    """Per method: KL to M0 at the end and at most, and the final accuracy, over the seeds run so far."""
    return {"original_accuracy": curves["on_policy"][0]["accuracy"][0], "steps": STEPS[size],
            "seeds": len(curves["on_policy"]), "curves": curves,
            "methods": {name: {"kl_final": [c["kl"][-1] for c in cs], "kl_max": [max(c["kl"]) for c in cs],
                               "accuracy_final": [c["accuracy"][-1] for c in cs]} for name, cs in curves.items()}}


def table(result: dict[str, Any]) -> str:
    """Markdown: KL to M0 at the end and at most, and the final accuracy."""
    lines = [f"| method | KL(M0 ‖ student) per sequence after {result['steps']} steps | largest KL on the way | "
             "final accuracy |", "|---|---|---|---|"]
    for name, r in result["methods"].items():
        lines.append(f"| {LABELS[name]} | {mean_std(r['kl_final'], '.4f')} | {mean_std(r['kl_max'], '.4f')} | "
                     f"{mean_std(r['accuracy_final'])} |")
    lines.append(f"\nM0 (the text toy's student) accuracy {result['original_accuracy']:.3f} (greedy exact match); KL "
                 f"on {KL_PROMPTS['full']} held-out prompts, one M0 sample each; mean ± std over {result['seeds']} seeds.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """KL to M0 and accuracy against steps, mean ± std band over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, cs in result["curves"].items():
        steps = np.array(cs[0]["steps"])
        for ax, key in zip(axes, ("kl", "accuracy")):
            ys = np.array([c[key] for c in cs])
            line, = ax.plot(steps, ys.mean(0), label=LABELS[name])
            ax.fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(), alpha=0.2)
    axes[0].set_ylabel("KL(M0 ‖ student) per sequence, held-out prompts (nats)")
    axes[1].set_ylabel("eval accuracy (exact match, greedy)")
    for ax in axes:
        ax.set_xlabel("training step (64 prompts each)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Self-distillation drift from M0, text toy; mean ± std over {result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
