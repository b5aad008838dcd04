"""Janus / Janus-Pro through transformers' Janus classes: tiny random models of the real classes, saved and
loaded by path, driven through the image_tokens adapter in text-to-image mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import JanusForConditionalGeneration

from mmopd import train
from mmopd.config import load_config
from mmopd.data.records import DataError
from mmopd.engines.hf import rollout
from mmopd.models.adapter import PolicySide
from mmopd.models.compat import IncompatibleModelsError
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from modalities.image_tokens import janus, shapes
from tests.image_tokens.helpers import GRID_TOKENS, build_janus_pair, build_llamagen_task

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "janus_pro_7b_to_1b.yaml"
PROMPTS = ["a red circle", "a blue square", "red triangle", "a blue circle"]  # different lengths: left padding


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus")
    paths = build_janus_pair(root)
    paths["train"] = root / "train.jsonl"
    paths["train"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return paths


def _config(pair, tmp_path, **overrides):
    base = {"modality": "image_tokens", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": GRID_TOKENS, "train.steps": 1,
            "train.batch_size": 2, "train.save_every": 0, "train.eval_every": 0, "train.warmup": 0,
            "train.out_dir": str(tmp_path / "run"), "train.progress": False}
    base.update(overrides)
    return load_config(None, base)


def _cached_logits(adapter, model, prompts, tokens):
    logits, state = adapter.calls.start(model, prompts)
    out = [logits]
    for t in range(tokens.shape[1] - 1):
        logits, state = adapter.calls.step(model, tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, 1)  # [B, T, K]


def test_janus_models_and_processors_load_by_path_with_the_model_vq(pair, tmp_path):
    session = Session(_config(pair, tmp_path, **{"teacher.cfg_scale": 4.0}))
    assert isinstance(session.policy, JanusForConditionalGeneration)
    assert isinstance(session.teacher, JanusForConditionalGeneration)
    processor = session.student_processor
    assert (processor.family, processor.codebook_size, processor.grid) == ("janus", 32, 4)
    assert torch.equal(processor.codebook(), session.policy.model.vqmodel.quantize.embedding.weight)
    assert session.space.size == 32 and session.eos_ids == []
    assert session.teacher_processor.cfg_scale == 4.0 and processor.cfg_scale == 1.0
    pictures = session.adapter.decode(torch.zeros(2, GRID_TOKENS, dtype=torch.long), torch.ones(2, GRID_TOKENS),
                                      processor)
    assert [p.size for p in pictures] == [(8, 8), (8, 8)]


def test_janus_unconditional_prompt_keeps_only_bos_and_begin_of_image(pair):
    tokenizer = janus.JanusImageTokenizer.from_pretrained(str(pair["student"]))
    ids, mask = tokenizer.encode_prompts(["a red circle", "blue"])  # [2, P], left-padded
    uncond, uncond_mask = tokenizer.unconditional(ids, mask)
    assert torch.equal(uncond_mask, mask)
    tok = tokenizer.tokenizer
    assert ids[:, -1].tolist() == [tokenizer.boi_token_id] * 2
    kept = {tok.bos_token_id, tokenizer.boi_token_id}
    for row, uncond_row in zip(ids.tolist(), uncond.tolist()):
        assert uncond_row == [t if t in kept else tok.pad_token_id for t in row]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_janus_teacher_forced_logits_equal_kv_cached_rollout_logits(pair, tmp_path, scale):
    session = Session(_config(pair, tmp_path, **{"teacher.cfg_scale": scale}))
    adapter = session.adapter
    prompts = adapter.encode_prompts(session.train_data.records, session.teacher_processor)
    out = rollout(PolicySide(adapter, session.teacher, None, session.space, [], session.pad_id), prompts, GRID_TOKENS,
                  Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    with torch.no_grad():
        forced = adapter.calls.response_logits(session.teacher, prompts, out.tokens)  # [B, T, K]
        cached = _cached_logits(adapter, session.teacher, prompts, out.tokens)
    assert forced.shape == (4, GRID_TOKENS, 32)
    assert torch.allclose(forced, cached, atol=1e-5)
    behaviour = forced.log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    assert torch.allclose(out.logprobs, behaviour, atol=1e-5)


def test_janus_guided_greedy_rollout_matches_transformers_generate(pair, tmp_path):
    session = Session(_config(pair, tmp_path, **{"teacher.cfg_scale": 3.0}))
    prompts = session.adapter.encode_prompts(session.train_data.records, session.teacher_processor)
    ours = rollout(PolicySide(session.adapter, session.teacher, None, session.space, [], session.pad_id), prompts,
                   GRID_TOKENS, Sampling(temperature=0))
    with torch.no_grad():
        theirs = session.teacher.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                          generation_mode="image", do_sample=False, guidance_scale=3.0)
    assert torch.equal(ours.tokens, theirs)


def test_janus_distillation_step_trains_the_student_from_the_guided_teacher(pair, tmp_path):
    config = _config(pair, tmp_path, **{"teacher.cfg_scale": 3.0})
    session = Session(config)
    head = session.policy.model.generation_head.vision_head.weight
    before = head.detach().clone()
    row = objective_step(session.models(), session.train_data.records[:2], Plan.of(config),
                         torch.Generator().manual_seed(0),
                         Timer(), lambda loss: loss.backward())
    assert row["response_tokens"] == 2 * GRID_TOKENS and row["divergence"] > 0
    assert head.grad is not None and head.grad.abs().sum() > 0
    torch.optim.SGD(session.policy.parameters(), lr=1.0).step()
    assert not torch.equal(before, head.detach())


def test_janus_pro_recipe_runs_a_step_with_tiny_models_of_the_same_classes(pair, tmp_path):
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["modality"] == "image_tokens"
    assert (recipe["student"]["path"], recipe["teacher"]["path"]) == ("deepseek-community/Janus-Pro-1B",
                                                                      "deepseek-community/Janus-Pro-7B")
    assert recipe["teacher"]["cfg_scale"] > 1 and recipe["rollout"]["max_new_tokens"] == 24 * 24
    overrides = {"student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
                 "teacher.dtype": "float32", "data.train": str(pair["train"]),
                 "rollout.max_new_tokens": GRID_TOKENS, "train.steps": 1, "train.batch_size": 2,
                 "train.grad_accum": 1, "train.out_dir": str(tmp_path / "run"), "train.progress": False}
    summary = train(load_config(RECIPE, overrides))
    assert summary["steps"] == 1 and summary["skipped_steps"] == 0
    step = tmp_path / "run" / "checkpoints" / "step-1" / "model"
    reloaded = Session(load_config(RECIPE, {**overrides, "student.path": str(step)}))
    assert isinstance(reloaded.policy, JanusForConditionalGeneration)
    assert reloaded.student_processor.family == "janus"


def test_a_janus_teacher_cannot_teach_a_llamagen_student(pair, tmp_path):
    llamagen = build_llamagen_task(tmp_path / "llamagen")
    labels = tmp_path / "train.jsonl"
    labels.write_text('{"label": 0}\n')
    config = load_config(None, {"modality": "image_tokens", "student.path": str(llamagen["student"]),
                                "teacher.path": str(pair["teacher"]), "data.train": str(labels),
                                "rollout.max_new_tokens": GRID_TOKENS})
    with pytest.raises(IncompatibleModelsError, match="student is a llamagen model and the teacher a janus model"):
        Session(config)


def test_janus_reads_text_prompts_not_labels(pair, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"label": 2}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*'label' needs a class-conditional student"):
        Session(_config(pair, tmp_path, **{"data.train": str(bad)}))


def test_janus_sft_targets_are_its_vq_codes_of_the_record_pictures(pair, tmp_path):
    pictures = shapes.make_images(2, seed=0)[0]
    for i, picture in enumerate(pictures):
        picture.save(tmp_path / f"{i}.png")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "image": f"{i}.png"}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    config = _config(pair, tmp_path, **{"objective.kind": "sft", "data.train": str(data)})
    session = Session(config)
    processor = session.student_processor
    answers = session.adapter.encode_answers(session.train_data.records, processor)
    resized = shapes.to_tensor([p.resize((processor.image_size,) * 2, Image.BILINEAR) for p in pictures])
    assert answers == processor.encode_images(resized).tolist()
    assert all(len(a) == GRID_TOKENS and max(a) < 32 for a in answers)
    row = objective_step(session.models(), session.train_data.records, Plan.of(config),
                         torch.Generator().manual_seed(0),
                         Timer(), lambda loss: loss.backward())
    assert row["response_tokens"] == 2 * GRID_TOKENS and row["nll"] > 0
