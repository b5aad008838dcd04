"""Where forward-KL and reverse-KL students put their mass when the teacher is multimodal.

    python -m experiments mode_seeking [--out DIR] [--size tiny|full] [--publish]

Task: the prompt is a two-digit number `n=`, and three two-digit answers are equally right (their first
digits differ, so the modes split at the first token). A teacher (the text toy's 0.53M Qwen3) is trained
on all three answers of every prompt, so it puts ~1/3 on each. The student is far smaller (1 layer,
width 32) so it cannot copy the teacher's three-way split on all 100 prompts and must choose how to be
wrong. From one short-SFT student start we train with on_policy + reverse KL, on_policy + forward KL (on
the student's own samples), and supervised_kd + forward KL (on the dataset answers, the classic KD), and
compute each model's exact probability of each right answer (teacher forcing, EOS included): sorted per
prompt into its most likely, second and third right answer, and everything else (wrong). Train and
eval prompts are the same 100: this is about the shape of a distribution, not generalisation.
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
import transformers  # noqa: E402

from experiments.text_task import mean_std, save_results, run_config  # noqa: E402
from modalities.text import toy  # noqa: E402

NAME = "mode_seeking"
SIZES: dict[str, dict[str, Any]] = {
    "full": {"prompts": 100, "teacher_steps": 400, "student_sft_steps": 40, "steps": 400, "batch_size": 64,
             "lr": 3e-3, "seeds": (0, 1, 2)},
    "tiny": {"prompts": 6, "teacher_steps": 2, "student_sft_steps": 1, "steps": 2, "batch_size": 4,
             "lr": 1e-3, "seeds": (0,)},
}
STUDENT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
METHODS: dict[str, dict[str, Any]] = {
    "reverse_kl (on_policy)": {"objective.kind": "on_policy", "objective.divergence": "reverse_kl"},
    "forward_kl (on_policy)": {"objective.kind": "on_policy", "objective.divergence": "forward_kl"},
    "forward_kl (supervised_kd)": {"objective.kind": "supervised_kd", "objective.divergence": "forward_kl"},
}
SLOTS = ("most likely right answer", "2nd right answer", "3rd right answer", "wrong (anything else)")


def answers(n: int) -> list[str]:
    """The three right answers to `n=`: first digits 0+n//10, 3+n//10, 6+n//10 (mod 10), so all differ."""
    return [f"{(3 * k + n // 10) % 10}{(n * m + c) % 10}" for k, (m, c) in enumerate(((7, 3), (3, 1), (9, 5)))]


def build(out: Path, cfg: dict[str, Any]) -> dict[str, str]:
    """Data (every right answer of every prompt), the trained teacher and the short-SFT small student."""
    paths = {"train": out / "data" / "train.jsonl", "teacher": out / "teacher", "student": out / "student"}
    if all((p / "tokenizer.json").exists() for p in (paths["teacher"], paths["student"])):
        return {k: str(v) for k, v in paths.items()}
    records = [{"prompt": f"{n:02d}=", "answer": a} for n in range(cfg["prompts"]) for a in answers(n)]
    toy.write_jsonl(paths["train"], records)
    tokenizer = toy.build_tokenizer()
    torch.manual_seed(0)
    teacher = toy.build_model(tokenizer, "teacher")
    toy.fit(teacher, tokenizer, records, cfg["teacher_steps"], 3e-3, 128, seed=0)
    torch.manual_seed(1)
    config = transformers.Qwen3Config(
        vocab_size=teacher.config.vocab_size, head_dim=STUDENT["hidden_size"] // STUDENT["num_attention_heads"],
        num_key_value_heads=STUDENT["num_attention_heads"], max_position_embeddings=toy.MAX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": toy.ROPE_THETA}, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **STUDENT)
    student = transformers.Qwen3ForCausalLM(config)
    student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    toy.fit(student, tokenizer, records, cfg["student_sft_steps"], 3e-3, 128, seed=1, warmup=0)
    for role, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return {k: str(v) for k, v in paths.items()}


@torch.no_grad()
def answer_mass(model_dir: str, prompts: int) -> np.ndarray:
    """Per prompt, the probability of each right answer followed by EOS. -> [prompts, 3]"""
    tokenizer = toy.build_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = [{"prompt": f"{n:02d}=", "answer": a} for n in range(prompts) for a in answers(n)]
    ids, mask, labels = toy.encode_sft(tokenizer, records)  # [N, T], right-padded, labels on answer + EOS
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)  # [N, T-1, V]
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)  # [N, T-1]
    return picked.sum(1).exp().reshape(prompts, 3).numpy()


def slots(mass: np.ndarray) -> np.ndarray:
    """Mean over prompts of the sorted right-answer masses and the rest. [prompts, 3] -> [4]"""
    ranked = -np.sort(-mass, axis=1)  # [prompts, 3]
    return np.concatenate([ranked.mean(0), [1 - mass.sum(1).mean()]])


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    """Build the task, distil with each divergence for each seed, write the plot, JSON and table."""
    cfg = SIZES[size]
    out = out / NAME
    paths = build(out, cfg)
    models: dict[str, list[np.ndarray]] = {"teacher": [slots(answer_mass(paths["teacher"], cfg["prompts"]))],
                                           "student start": [slots(answer_mass(paths["student"], cfg["prompts"]))]}
    seconds: dict[str, list[float]] = {}
    for seed in cfg["seeds"]:
        for name, overrides in METHODS.items():
            run_dir = run_config(out / "runs" / f"{overrides['objective.kind']}_{overrides['objective.divergence']}"
                                 / f"seed{seed}",
                                 {"modality": "text", "student.path": paths["student"], "teacher.path": paths["teacher"],
                                  "data.train": paths["train"], "rollout.max_new_tokens": 3,
                                  "train.batch_size": cfg["batch_size"], "train.lr": cfg["lr"], "train.warmup": 0,
                                  "train.steps": cfg["steps"], "train.save_every": 0, "train.seed": seed,
                                  "train.progress": False, **overrides})
            final = run_dir / "final"
            if not (final / "config.json").exists():
                raise RuntimeError(f"{run_dir} has no final student")
            models.setdefault(name, []).append(slots(answer_mass(str(final), cfg["prompts"])))
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            seconds.setdefault(name, []).append(sum(r["time/step"] for r in rows if "time/step" in r))
    result = {"slots": list(SLOTS), "prompts": cfg["prompts"], "seeds": len(cfg["seeds"]), "steps": cfg["steps"],
              "student": STUDENT, "models": {k: [v.tolist() for v in vs] for k, vs in models.items()},
              "train_seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    plot(models, out / f"results_{NAME}.png", len(cfg["seeds"]))
    save_results(out, NAME, result, table(models), root)
    return result


def table(models: dict[str, list[np.ndarray]]) -> str:
    """Markdown: mean probability per slot (± std over seeds), and the right-answer mass in total."""
    lines = ["| model | " + " | ".join(SLOTS) + " | all right answers | top answer's share of the right mass |",
             "|---|" + "---|" * (len(SLOTS) + 2)]
    for name, vs in models.items():
        cells = [mean_std([v[i] for v in vs]) for i in range(len(SLOTS))]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_std([1 - v[-1] for v in vs])} | "
                     f"{mean_std([v[0] / max(1 - v[-1], 1e-9) for v in vs])} |")
    return "\n".join(lines) + "\n"


def plot(models: dict[str, list[np.ndarray]], path: Path, seeds: int) -> None:
    """Grouped bars: mean probability per slot for each model, std over seeds as error bars."""
    fig, (ax, right) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [4, 3]})
    width = 0.8 / len(models)
    x = np.arange(len(SLOTS))
    for i, (name, vs) in enumerate(models.items()):
        values = np.array(vs)  # [seeds, 4]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values.mean(0), width, yerr=values.std(0) if len(vs) > 1
               else None, capsize=3, label=name)
        shares = values[:, :3] / np.clip(1 - values[:, 3:], 1e-9, None)  # [seeds, 3], the right mass normalised
        right.bar(np.arange(3) + (i - (len(models) - 1) / 2) * width, shares.mean(0), width,
                  yerr=shares.std(0) if len(vs) > 1 else None, capsize=3, label=name)
    right.axhline(1 / 3, color="black", linestyle=":", linewidth=1)
    right.set_xticks(np.arange(3), SLOTS[:3])
    right.set_ylabel("share of the right-answer mass")
    right.set_ylim(0, 1)
    right.set_title("the same, given the answer is right", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    ax.axhline(1 / 3, color="black", linestyle=":", linewidth=1, label="1/3 (an even split of the right answers)")
    ax.set_xticks(x, SLOTS)
    ax.set_ylabel("probability (mean over prompts)")
    ax.set_ylim(0, 1)
    ax.set_title(f"A teacher with three right answers per prompt: where each student puts its mass "
                 f"(mean ± std over {seeds} seeds)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
