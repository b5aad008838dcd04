"""Self-distillation with privileged context (OPSD) lifts the text toy's accuracy; plain self-distillation does not
move the student at all.

M0: the toy's student SFT'd on two-digit addition, half of its examples with the answer written before the problem
(`teacher_prompt`: answer, ';', prompt), so that it learns to copy an answer it is shown and, less well, to add.
Both runs start from M0 and use M0 as their own teacher (teacher.path = student.path) on 16 problems: with the
privileged prompt the teacher, which reads the answer, scores the student's samples; without it the teacher is the
student, so the reverse KL and its gradient are exactly 0 and the student stays M0. Measured (train.seed 0): M0
answers 0 of the 16 problems greedily and 16 of 16 when shown the answer; 30 steps of OPSD (16 prompts a step, one
sample each, lr 1e-3) lift it to 15 of 16, and plain self-distillation leaves it at 0 with every step's divergence
and gradient norm 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmopd import train
from mmopd.config import load_config
from modalities.text import toy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # about 21 s on one core
STEPS = 30


def _with_answer(record: dict) -> dict:
    """The record with its privileged prompt: the answer, then the problem."""
    return {**record, "teacher_prompt": f"{record['answer']};{record['prompt']}"}


def _run(m0: Path, data: Path, out: Path) -> dict:
    config = load_config(None, {
        "modality": "text", "student.path": str(m0), "teacher.path": str(m0), "data.train": str(data),
        "data.eval": str(data), "rollout.max_new_tokens": 12, "train.steps": STEPS, "train.batch_size": 16,
        "train.lr": 1e-3, "train.warmup": 0, "train.eval_every": 0, "train.save_every": 0, "train.progress": False,
        "train.eval_kl_prompts": 0, "train.seed": 0, "train.out_dir": str(out)})
    return train(config)


def test_self_distillation_with_the_answer_in_the_teachers_prompt_lifts_accuracy(tmp_path: Path):
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    m0 = toy.build_model(tokenizer, "student")
    problems = toy.make_records(2000, seed=1, digits=2)
    shown = [{"prompt": r["teacher_prompt"], "answer": r["answer"]} for r in map(_with_answer, problems[::2])]
    toy.fit(m0, tokenizer, problems[1::2] + shown, 120, 3e-3, 64, 0, warmup=10)
    m0.save_pretrained(tmp_path / "m0")
    tokenizer.save_pretrained(tmp_path / "m0")
    held = toy.make_records(16, seed=7, digits=2)
    toy.write_jsonl(tmp_path / "privileged.jsonl", [_with_answer(r) for r in held])
    toy.write_jsonl(tmp_path / "plain.jsonl", held)

    privileged = _run(tmp_path / "m0", tmp_path / "privileged.jsonl", tmp_path / "privileged")
    plain = _run(tmp_path / "m0", tmp_path / "plain.jsonl", tmp_path / "plain")
    # measured: M0 0/16 on the plain prompts, 16/16 shown the answer; after 30 steps 15/16
    assert privileged["teacher"] == privileged["student_before"]  # the teacher on the student's prompts is M0
    assert privileged["teacher_privileged"] >= privileged["student_before"] + 12 / 16
    assert privileged["student_after"] >= privileged["student_before"] + 8 / 16, privileged
    assert plain["student_after"] == plain["student_before"], plain
    rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["divergence"] == 0 and r["grad_norm"] == 0 for r in rows if "loss" in r)
