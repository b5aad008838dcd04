"""How best to recover a depth-pruned Gemma 3 270M? On-policy distillation against its unpruned teacher, beside
supervised KD, SFT on the teacher's samples, healing first, and GKD.

    python -m experiments.gemma_recovery --teacher DIR --student DIR [--out DIR] [--methods opd,heal_opd]
        [--steps N] [--seeds 0,1,2]

Prompts: the first 10 words of Python standard-library docstrings (train and held-out modules differ) and a
few-shot task with checkable answers (single-digit addition, capital cities), whose train and eval splits share no
pair and no country. Each method runs `steps` optimizer steps of `batch` prompts and `new` new tokens, with the
fused loss over the full 262k vocabulary. Measured on held-out prompts before and after: the reverse KL on the
student's own samples, the forward KL on the teacher's samples (coverage), the share of repeated 3-grams in the
student's samples, and the task accuracy (greedy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import mmopd
from modalities.text.heldout import docstring_task_data, measure

# each method: a list of stages (config overrides), run one after the other on the same student
METHODS: dict[str, list[list[str]]] = {
    "opd": [["objective.kind=on_policy", "objective.divergence=reverse_kl"]],
    "supervised_kd": [["objective.kind=supervised_kd", "objective.divergence=forward_kl"]],
    "seq_kd": [["objective.kind=sft"]],  # the NLL of the teacher's samples, stored as the records' answers
    "seqkd_opd": [["objective.kind=sft"], ["objective.kind=on_policy", "objective.divergence=reverse_kl"]],
    "skd_opd": [["objective.kind=supervised_kd", "objective.divergence=forward_kl"],
                ["objective.kind=on_policy", "objective.divergence=reverse_kl"]],
    "gkd": [["objective.kind=gkd", "objective.lmbda=0.5", "objective.divergence=reverse_kl"]],
}


def load(path: str | Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_data(out: Path, teacher_dir: str, train_prompts: int, new: int) -> dict[str, Any]:
    """Train records (docstring and task prompts, each with a teacher sample as its answer) and the held-out sets;
    cached in `out`."""
    cache = out / "data.json"
    if cache.exists():
        return json.loads(cache.read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    data = docstring_task_data(load(teacher_dir), tokenizer, train_prompts, 16, new)
    cache.write_text(json.dumps(data))
    return data


def measure_dir(student_dir: str | Path, teacher: transformers.PreTrainedModel, tokenizer: Any, data: dict,
                new: int) -> dict[str, Any]:
    return measure(load(student_dir), teacher, tokenizer, data["held_out"], data["held_out_teacher"], data["task"],
                   new)


def run_method(method: str, seed: int, args: argparse.Namespace, data_file: Path) -> Path:
    """Run a method's stages on the pruned student; return the final model's folder."""
    student = args.student
    stages = METHODS[method]
    for i, overrides in enumerate(stages):
        out = Path(args.out) / f"{method}-s{seed}" / f"stage{i}"
        config = mmopd.load_config(None, [
            "modality=text", f"student.path={student}", f"teacher.path={args.teacher}", f"data.train={data_file}",
            f"train.out_dir={out}", f"rollout.max_new_tokens={args.new}", f"train.steps={args.steps // len(stages)}",
            f"train.batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup=2", f"train.seed={seed}",
            "train.eval_every=0", "train.save_every=8", "train.keep_last=1", "objective.fused=always",
            *overrides])
        mmopd.train(config)
        student = str(max((out / "checkpoints").glob("step-*"), key=lambda d: int(d.name[5:])) / "model")
    return Path(student)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", default="runs/gemma_recovery")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--train-prompts", type=int, default=96)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, args.teacher, args.train_prompts, args.new)
    data_file = write_jsonl(out / "train.jsonl", data["train"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.teacher)
    teacher = load(args.teacher)
    results_file = out / "results.jsonl"
    done = {(r["method"], r["seed"]) for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.exists() else set()
    if ("pruned", 0) not in done:
        row = {"method": "pruned", "seed": 0, **measure_dir(args.student, teacher, tokenizer, data, args.new)}
        with results_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            if (method, seed) in done:
                continue
            started = time.time()
            final = run_method(method, seed, args, data_file)
            row = {"method": method, "seed": seed, "train_s": time.time() - started,
                   **measure_dir(final, teacher, tokenizer, data, args.new)}
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
