"""Every text toy family distils end to end: a tiny student of the family's real transformers class (dense
Qwen3, or Qwen3-MoE with routed experts), saved and loaded by path, runs on-policy steps through `mmopd.train`
with both estimators, and the MoE student's experts get gradients."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import mmopd
from mmopd.config import load_config
from mmopd.run.report import read_metrics
from modalities.text import toy

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY_CLASSES = {"qwen3": "Qwen3ForCausalLM", "qwen3_hd32": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "cross_tokenizer": "Qwen3ForCausalLM"}
# (family, estimator) pairs that train: a student with its own tokenizer takes the sampled span estimator only
RUNS = [(family, estimator) for family in FAMILY_CLASSES for estimator in ("full", "sampled")
        if family not in toy.OWN_TOKENIZER or estimator == "sampled"]


@pytest.fixture(scope="module")
def family_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_families")
    return {family: toy.build_untrained(root / family, size, family) for family, size in toy.FAMILIES.items()}


def run(pairs, family, tmp_path, **overrides):
    paths = pairs[family]
    config = load_config(None, {
        "modality": "text", "student.path": str(paths["student"]), "teacher.path": str(paths["teacher"]),
        "data.train": str(paths["train"]), "rollout.max_new_tokens": 8, "train.steps": 2, "train.batch_size": 4,
        "train.eval_every": 0, "train.save_every": 2, "train.out_dir": str(tmp_path / "run"),
        "train.progress": False, "train.warmup": 0, "train.lr": 1e-2, **overrides})
    summary = mmopd.train(config)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    return summary, rows


def test_every_family_is_listed_with_its_class():
    assert set(toy.FAMILIES) == set(FAMILY_CLASSES)


@pytest.mark.parametrize("family, estimator", RUNS)
def test_two_on_policy_steps_run_through_a_tiny_student_of_every_family(family_pairs, family, estimator, tmp_path):
    summary, rows = run(family_pairs, family, tmp_path, **{"objective.estimator": estimator})
    assert summary["steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["response_tokens"] > 0 for r in rows)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-2" / "model")
    assert type(saved).__name__ == FAMILY_CLASSES[family]


def test_the_cross_tokenizer_familys_student_reads_other_tokens_than_its_teacher(family_pairs):
    paths = family_pairs["cross_tokenizer"]
    student, teacher = (toy.student_tokenizer("cross_tokenizer"), toy.build_tokenizer())
    assert student.convert_ids_to_tokens(student("13;09;#933", add_special_tokens=False)["input_ids"]) == \
        ["13;", "09;", "#", "9", "3", "3"]
    assert student.get_vocab() != teacher.get_vocab() and (paths["student"] / "tokenizer.json").is_file()


def test_distilling_a_moe_student_moves_its_router_and_its_experts(family_pairs, tmp_path):
    start = AutoModelForCausalLM.from_pretrained(family_pairs["qwen3_moe"]["student"])
    run(family_pairs, "qwen3_moe", tmp_path)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-2" / "model")
    before = dict(start.named_parameters())
    moved = {name for name, p in after.named_parameters() if not torch.equal(p, before[name])}
    assert any(".mlp.gate." in name for name in moved), sorted(moved)  # the router
    assert any(".mlp.experts." in name for name in moved), sorted(moved)
    assert start.config.num_experts == 4 and start.config.num_experts_per_tok == 2
