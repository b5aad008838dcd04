"""Gemma 3 270M, the real pretrained model of the optional extra `mmopd[gemma]`: exported from its GGUF package
into an HF folder (once per test session), depth-pruned exactly, and distilled for two fused on-policy steps into
its pruned student. Each test is kept cheap: short prompts, a few new tokens, batch 2."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mmopd
from mmopd.cli import main
from mmopd.config import load_config
from mmopd.engines.hf import rollout
from mmopd.models.adapter import PolicySide, get_adapter
from mmopd.models.pruning import prune_layers
from mmopd.run.report import read_metrics
from mmopd.step.batch import Sampling, TokenSpace
from tests.conftest import write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

KEEP = [0, 2, 5, 8, 11, 14, 17]
QUESTION = "Question: What is 12 + 7?\nAnswer:"


@pytest.fixture(scope="module")
def gemma(gemma_real):
    """The packaged GGUF exported to an ordinary fp32 HF folder (once per clone)."""
    return gemma_real["teacher"]


@pytest.fixture(scope="module")
def teacher(gemma):
    return AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_exported_folder_loads_as_gemma_3_270m_without_gguf(gemma, teacher):
    config = json.loads((gemma / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["Gemma3ForCausalLM"]
    assert teacher.config.num_hidden_layers == 18 and teacher.config.vocab_size == 262_144
    assert teacher.lm_head.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()  # tied
    tokenizer = AutoTokenizer.from_pretrained(gemma)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)


def test_mmopds_greedy_decode_loop_answers_like_the_teacher(gemma, teacher):
    adapter = get_adapter("text")
    tokenizer = adapter.load_processor(str(gemma), "teacher")
    prompts = adapter.encode_prompts([{"prompt": QUESTION}, {"prompt": "The capital of France is"}], tokenizer)
    assert prompts.input_ids[0, 0] == tokenizer.bos_token_id and prompts.attention_mask[1, 0] == 0  # BOS, left pad
    side = PolicySide(adapter, teacher, tokenizer, TokenSpace(len(tokenizer)), [1], 0)
    out = rollout(side, prompts, 10, Sampling(temperature=0))
    assert tokenizer.decode(out.tokens[0]).startswith(" 12 + 7 = 19")  # one token a digit


def test_pruning_that_keeps_all_18_layers_gives_the_same_logits(teacher):
    ids = torch.tensor([[2, 651, 5279, 529, 7001, 563]])  # [1, 6]
    before = logits(teacher, ids)
    kept_all = prune_layers(copy.deepcopy(teacher), list(range(18)))
    assert torch.equal(logits(kept_all, ids), before)


def test_a_pruned_gemmas_layers_are_the_kept_teacher_layers(teacher):
    student = prune_layers(copy.deepcopy(teacher), KEEP)
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in KEEP]
    for new, old in enumerate(KEEP):
        assert student.model.layers[new].self_attn.layer_idx == new
        for (name, p), (_, q) in zip(student.model.layers[new].named_parameters(),
                                     teacher.model.layers[old].named_parameters()):
            assert torch.equal(p, q), f"layer {new} (teacher {old}) {name}"


def test_two_fused_on_policy_steps_distil_gemma_into_its_pruned_student(gemma, tmp_path):
    assert main(["prune", str(gemma), str(tmp_path / "student"), "--keep", ",".join(map(str, KEEP))]) == 0
    rows = [{"prompt": text} for text in ("Return the sum of a sequence of numbers", "Split the string at the",
                                          "Open a file and return a", "Make an iterator that returns")]
    config = load_config(None, {
        "modality": "text", "student.path": str(tmp_path / "student"), "teacher.path": str(gemma),
        "data.train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "objective.fused": "always",
        "rollout.engine": "hf", "rollout.max_new_tokens": 4, "train.steps": 2, "train.batch_size": 2,
        "train.lr": 5e-5, "train.warmup": 0, "train.eval_every": 0, "train.save_every": 2,
        "train.out_dir": str(tmp_path / "run"), "train.progress": False})
    summary = mmopd.train(config)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 2 and [r["fused"] for r in steps] == [1.0, 1.0]
    assert all(math.isfinite(r["divergence"]) and r["divergence"] > 0 for r in steps)
    assert all("health/token_entropy" in r for r in steps)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-2" / "model")
    assert saved.config.num_hidden_layers == len(KEEP)
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
