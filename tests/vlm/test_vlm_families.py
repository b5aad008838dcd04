"""Every supported VLM family distils end to end: a tiny model of the family's real transformers
classes, saved and loaded by path, runs on-policy steps through `mmopd.train`."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

import mmopd
from mmopd.models.adapter import get_adapter
from mmopd.run.report import read_metrics
from modalities.vlm.families import FAMILIES
from tests.vlm.fixtures import STUDENT_IMAGE_TOKENS, TEACHER_IMAGE_TOKENS

FAMILY_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_two_on_policy_steps_run_through_a_tiny_model_of_every_family(family, vlm_config, tmp_path):
    config = vlm_config(family)
    summary = mmopd.train(config)
    assert summary["steps"] == 2
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["divergence"] >= 0 and r["response_tokens"] > 0 for r in rows)
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "checkpoints" / "step-2" / "model")
    assert type(saved).__name__ == FAMILY_CLASSES[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_and_student_encode_the_same_picture_with_their_own_processors(family, vlm_pair, vlm_data):
    adapter = get_adapter("vlm")
    pair = vlm_pair(family)
    record = adapter.check_record({"images": ["img/train-00000.png"], "prompt": "what colour is the square?"},
                                  vlm_data["train"].parent)
    lengths = {}
    for role in ("teacher", "student"):
        processor = adapter.load_processor(str(pair[role]), role)
        model = adapter.calls.load_model(str(pair[role]), role, torch.float32)
        ids = adapter.encode_prompts([record], processor).input_ids  # [1, P]
        placeholders = adapter.placeholder_ids(processor, model)
        lengths[role] = ids.numel()
        image_tokens = sum(int(t) in placeholders for t in ids[0])
        assert image_tokens >= (TEACHER_IMAGE_TOKENS if role == "teacher" else STUDENT_IMAGE_TOKENS)
    assert lengths["teacher"] - lengths["student"] == TEACHER_IMAGE_TOKENS - STUDENT_IMAGE_TOKENS


def test_eval_and_the_answer_grid_run_with_an_eval_split(vlm_config, vlm_data, tmp_path):
    summary = mmopd.train(vlm_config("llava", **{"data.eval": str(vlm_data["eval"])}))
    assert {"teacher", "student_before", "student_after"} <= set(summary)
    assert all(0.0 <= summary[k] <= 1.0 for k in ("teacher", "student_before", "student_after"))
    grid = tmp_path / "run" / "plots" / "answers.png"
    assert grid.is_file() and grid.stat().st_size > 0


def test_teacher_and_student_with_different_chat_templates_each_encode_their_own_prompt(vlm_config, vlm_pair,
                                                                                         tmp_path):
    from transformers import AutoProcessor

    pair = vlm_pair("llava")
    student_dir = tmp_path / "student"
    model = AutoModelForImageTextToText.from_pretrained(pair["student"])
    processor = AutoProcessor.from_pretrained(pair["student"])
    processor.chat_template = "what shape is the one ? " + processor.chat_template  # a fixed preamble
    model.save_pretrained(student_dir)
    processor.save_pretrained(student_dir)
    adapter = get_adapter("vlm")
    question = [{"role": "user", "content": [{"type": "text", "text": "how many shapes are there?"}]}]
    texts = {role: adapter.load_processor(str(path), role).apply_chat_template(question, tokenize=False,
                                                                                add_generation_prompt=True)
             for role, path in (("teacher", pair["teacher"]), ("student", student_dir))}
    assert texts["student"] == "what shape is the one ? " + texts["teacher"]
    summary = mmopd.train(vlm_config("llava", **{"student.path": str(student_dir)}))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 2 and all(math.isfinite(r["loss"]) for r in rows)
