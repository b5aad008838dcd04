"""Distil a small causal LM from a larger one on your own prompts, from Python.

    python examples/distil_text.py STUDENT TEACHER train.jsonl [--eval eval.jsonl] [--out DIR] [key=value ...]

STUDENT and TEACHER are `save_pretrained` directories (or hub ids) that share a tokenizer. Records are JSONL
lines `{"prompt": "...", "answer": "..."}`; the answer is only needed to score the eval split. Any config key
can follow as an override, e.g. `train.steps=500 student.trainable=lora`.
"""

from __future__ import annotations

import argparse

import mmopd


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student")
    parser.add_argument("teacher")
    parser.add_argument("train")
    parser.add_argument("--eval", default="")
    parser.add_argument("--out", default="runs/distil_text")
    args, overrides = parser.parse_known_args(argv)
    config = mmopd.load_config(None, [
        "modality=text", f"student.path={args.student}", f"teacher.path={args.teacher}",
        f"data.train={args.train}", f"data.eval={args.eval}", f"train.out_dir={args.out}",
        "objective.kind=on_policy",  # the student samples; the teacher scores every sampled token
        "objective.divergence=reverse_kl",  # per-token KL(student || teacher), the full distribution
        "rollout.max_new_tokens=256", "rollout.temperature=1.0",
        "train.steps=200", "train.batch_size=16", "train.lr=1e-5", "train.warmup=10",
        *overrides,
    ])
    return mmopd.train(config)


if __name__ == "__main__":
    main()
