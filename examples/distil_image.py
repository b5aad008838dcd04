"""Distil an unguided image-token generator from a classifier-free-guided teacher, from Python.

    python examples/distil_image.py STUDENT TEACHER train.jsonl [--eval eval.jsonl] [--judge DIR] [--out DIR]
                                    [key=value ...]

STUDENT and TEACHER are generators over one visual codebook (Janus-Pro, or mmopd's LlamaGen-style
generator), saved with `save_pretrained`. Records are JSONL lines `{"prompt": "a red circle"}` or
`{"label": 3}`. The teacher samples with CFG at `teacher.cfg_scale`; the student learns to draw its guided
pictures without the unconditional pass, so it samples at about twice the speed.
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
    parser.add_argument("--judge", default="", help="a classifier directory that scores the eval pictures")
    parser.add_argument("--out", default="runs/distil_image")
    args, overrides = parser.parse_known_args(argv)
    config = mmopd.load_config(None, [
        "modality=image_tokens", f"student.path={args.student}", f"teacher.path={args.teacher}",
        f"data.train={args.train}", f"data.eval={args.eval}", f"data.judge={args.judge}",
        f"train.out_dir={args.out}",
        "teacher.cfg_scale=2.0",  # the guided teacher: uncond + s·(cond − uncond) logits
        "rollout.max_new_tokens=576",  # one picture: Janus-Pro draws 24×24 codes (the LlamaGen toy 8×8 = 64)
        "objective.kind=on_policy", "objective.divergence=reverse_kl",
        "train.steps=200", "train.batch_size=16", "train.lr=1e-4", "train.warmup=10",
        *overrides,
    ])
    return mmopd.train(config)


if __name__ == "__main__":
    main()
