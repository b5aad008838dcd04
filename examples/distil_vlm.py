"""Distil a small vision-language model from a larger one on your own pictures and questions, from Python.

    python examples/distil_vlm.py STUDENT TEACHER train.jsonl [--eval eval.jsonl] [--out DIR] [key=value ...]

STUDENT and TEACHER are `save_pretrained` directories (or hub ids) of image-text-to-text models that share a
tokenizer, e.g. Qwen2.5-VL-3B and -7B; each reads the prompt through its own processor. Records are JSONL
lines `{"images": ["img/0001.png"], "prompt": "...", "answer": "..."}`, paths relative to the JSONL file.
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
    parser.add_argument("--out", default="runs/distil_vlm")
    args, overrides = parser.parse_known_args(argv)
    config = mmopd.load_config(None, [
        "modality=vlm", f"student.path={args.student}", f"teacher.path={args.teacher}",
        f"data.train={args.train}", f"data.eval={args.eval}", f"train.out_dir={args.out}",
        "student.trainable=lm_only",  # the vision tower stays frozen; the language model learns
        "objective.kind=on_policy", "objective.divergence=reverse_kl",
        "rollout.max_new_tokens=128",
        "train.steps=200", "train.batch_size=8", "train.lr=1e-5", "train.warmup=10",
        *overrides,
    ])
    return mmopd.train(config)


if __name__ == "__main__":
    main()
