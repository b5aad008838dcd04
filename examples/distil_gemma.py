"""Distil a real pretrained model on a CPU: Gemma 3 270M into a depth-pruned copy of itself, and read what it writes.

    pip install -e ".[gemma]"        # Gemma 3 270M from PyPI (GGUF, Q4_K_M) and gguf: ~240 MB
    python examples/distil_gemma.py [--out runs/gemma] [--keep 0,2,5,8,11,14,17] [--steps 32] [--seed 0]
                                    [--teacher HF_FOLDER] [--train-prompts 96] [--held-out 16] [--new-tokens 24]
                                    [key=value ...]   (config overrides for every stage, e.g. train.lr=1e-5)

1. The teacher: the packaged GGUF exported as an ordinary HF folder (`mmopd export-gguf`), or --teacher. The
   student: the teacher with only the layers in --keep (`mmopd prune`); it starts out writing word salad.
2. Prompts that nobody here wrote: the opening words of Python standard-library docstrings (train and held-out
   prompts come from different modules), and a few-shot task with checkable answers (single-digit addition,
   capital cities) that the teacher answers and the pruned student does not.
3. The recipe, RECIPE below: the student first learns from the teacher's samples (supervised KD, forward KL),
   then distils on-policy (full reverse KL over the 262k vocabulary, through the fused loss) with the teacher's
   samples' NLL kept beside it. Every step logs the health of the student's samples (`health/*` in
   metrics.jsonl) and warns if they collapse.
4. Before and after, on held-out prompts: the reverse KL on the student's own samples (what OPD lowers), the
   forward KL on the teacher's samples (coverage, which a collapsed student cannot fake), the health of the
   student's samples, the task accuracy (greedy). It prints a table, some samples, and writes a plot.

Everything is cached in --out: a second run reuses the folders, the data and finished stages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import mmopd  # noqa: E402
from mmopd.models.pretrained import export_gguf, packaged_gguf  # noqa: E402
from mmopd.models.pruning import parse_keep, prune_checkpoint  # noqa: E402
from mmopd.run.report import read_metrics  # noqa: E402
from modalities.text.fewshot import task_accuracy  # noqa: E402
from modalities.text.heldout import docstring_task_data, greedy_responses, measure  # noqa: E402

# (name, share of --steps, objective overrides): run one after the other on the same student
RECIPE = [
    ("heal", 0.5, ["objective.kind=supervised_kd", "objective.divergence=forward_kl"]),  # on the teacher's samples
    # the reverse KL on the student's own samples, with the teacher's samples' NLL beside it at every step: without
    # it this student drifts into number soup that the teacher also finds likely (RESULTS.md, section 11)
    ("on_policy", 0.5, ["objective.kind=on_policy", "objective.divergence=reverse_kl", "objective.sft_weight=1.0"]),
]
ROWS = (("reverse KL, student's samples (nats/token)", "reverse_kl"),
        ("forward KL, teacher's samples (nats/token)", "forward_kl"),
        ("token entropy of the student's samples", "health/token_entropy"),
        ("repeated 3-grams in them", "health/repeat_share"),
        ("task accuracy (addition, capitals)", "task_accuracy"))


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prepare(out: Path, keep: list[int], teacher: Path | None) -> tuple[Path, Path]:
    """The teacher's folder (exported once, unless given) and the pruned student's (made once)."""
    student = out / "student"
    if teacher is None:
        teacher = out / "teacher"
        if not (teacher / "config.json").exists():
            export_gguf(packaged_gguf("gemma3-270m"), teacher)
    if not (student / "config.json").exists():
        prune_checkpoint(teacher, student, keep)
    return teacher, student


def build_data(out: Path, teacher_dir: Path, args: argparse.Namespace) -> dict:
    """Train records (docstring prompts and the task's train split, answered by teacher samples) and the held-out
    sets (docstring prompts from other modules with a teacher sample each, the task's eval split)."""
    cache = out / "data.json"
    if cache.exists():
        return json.loads(cache.read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    data = docstring_task_data(load(teacher_dir), tokenizer, args.train_prompts, args.held_out, args.new_tokens)
    cache.write_text(json.dumps(data))
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data["train"]))
    return data


def distil(out: Path, teacher: Path, student: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """Run RECIPE's stages; return the final student's folder and each stage's run directory."""
    runs = []
    for name, share, overrides in RECIPE:
        run = out / "runs" / name
        config = mmopd.load_config(None, [
            "modality=text", f"student.path={student}", f"teacher.path={teacher}",
            f"data.train={out / 'train.jsonl'}", f"train.out_dir={run}", f"train.seed={args.seed}",
            f"rollout.max_new_tokens={args.new_tokens}", f"train.steps={max(1, round(args.steps * share))}",
            "train.batch_size=4", "train.lr=5e-5", "train.warmup=2", "train.eval_every=0", "train.save_every=8",
            "train.keep_last=1", "objective.fused=always", *overrides, *args.overrides])
        mmopd.train(config)
        student = max((run / "checkpoints").glob("step-*"), key=lambda d: int(d.name[5:])) / "model"
        runs.append(run)
    return student, runs


def plot(out: Path, runs: list[Path]) -> Path:
    """Per step, through the stages: the training divergence and the health of the student's samples."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    offset = 0
    for (name, _, _), run in zip(RECIPE, runs):
        rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        steps = [offset + r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=name)
        for ax, key in zip(axes[1:], ("health/token_entropy", "health/repeat_share")):
            points = [(offset + r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), "o-", ms=3, label=name)
        offset = steps[-1] if steps else offset
    for ax, title in zip(axes, ("training loss", "token entropy of the student's samples (nats)",
                                "share of repeated 3-grams in them")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "gemma_distil.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gemma")
    parser.add_argument("--keep", default="0,2,5,8,11,14,17", help="the teacher's layers the student keeps")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps over the whole recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", type=Path, help="an HF causal LM folder to use instead of the packaged Gemma")
    parser.add_argument("--train-prompts", type=int, default=96, help="docstring prompts to train on")
    parser.add_argument("--held-out", type=int, default=16, help="held-out docstring prompts to measure on")
    parser.add_argument("--new-tokens", type=int, default=24)
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides  # config overrides, for every stage
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir, student_dir = prepare(out, parse_keep(args.keep), args.teacher)
    data = build_data(out, teacher_dir, args)
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    teacher = load(teacher_dir)

    def measured(folder: Path) -> dict:
        return measure(load(folder), teacher, tokenizer, data["held_out"], data["held_out_teacher"], data["task"],
                       args.new_tokens)

    before = measured(student_dir)
    final, runs = distil(out, teacher_dir, student_dir, args)
    after = measured(final)
    task_prompts = [r["prompt"] for r in data["task"]]
    teacher_task = task_accuracy(data["task"], greedy_responses(teacher, tokenizer, task_prompts))
    print(f"\n{'held-out measure':<46} {'pruned':>8} {'after':>8}")
    for label, key in ROWS:
        print(f"{label:<46} {before[key]:>8.3f} {after[key]:>8.3f}")
    print(f"(the teacher's task accuracy: {teacher_task:.3f})")
    for prompt, text in list(zip(data["held_out"], after["samples"]))[:3]:
        print(f"\n{prompt!r}\n  -> {text!r}")
    warnings = [w for run in runs for w in json.loads((run / "summary.json").read_text()).get("health_warnings", [])]
    print(f"\nsample-health warnings: {len(warnings)}" + "".join(f"\n  {w['message']}" for w in warnings))
    result = {"before": before, "after": after, "teacher_task_accuracy": teacher_task, "health_warnings": warnings,
              "plot": str(plot(out, runs))}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"plot: {result['plot']}")
    return result


if __name__ == "__main__":
    main()
