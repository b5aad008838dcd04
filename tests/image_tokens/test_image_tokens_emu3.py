"""Emu3 through transformers' Emu3 classes: tiny random models of the real classes, saved and loaded by path.
Its pictures are rows of visual tokens ending in an end-of-line token, then three end tokens; the adapter
keeps that layout at every position, in sampling and in scoring."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import Emu3ForConditionalGeneration

from mmopd.config import ConfigError, load_config
from mmopd.engines.hf import rollout
from mmopd.losses import token_divergence
from mmopd.models.adapter import PolicySide
from mmopd.models.compat import IncompatibleModelsError
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from mmopd.step.batch import Sampling
from tests.image_tokens.helpers import build_emu3_pair

T = 4 * (4 + 1) + 3  # 4 rows of 4 codes + end-of-line, then end-of-frame, end-of-image, EOS
PROMPTS = ["a red circle", "blue square", "a blue triangle"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3")
    paths = build_emu3_pair(root)
    paths["train"] = root / "train.jsonl"
    paths["train"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return paths


def _session(pair, tmp_path, **overrides) -> Session:
    base = {"modality": "image_tokens", "student.path": str(pair["student"]), "teacher.path": str(pair["teacher"]),
            "data.train": str(pair["train"]), "rollout.max_new_tokens": T, "train.out_dir": str(tmp_path / "run"),
            "train.progress": False}
    base.update(overrides)
    return Session(load_config(None, base))


def _sample(session: Session, model, processor, temperature: float = 1.0):
    prompts = session.adapter.encode_prompts(session.train_data.records, processor)
    out = rollout(PolicySide(session.adapter, model, None, session.space, session.eos_ids, session.pad_id), prompts, T,
                  Sampling(temperature=temperature), torch.Generator().manual_seed(0))
    return prompts, out


def test_emu3_loads_by_path_and_its_action_space_is_the_visual_tokens_plus_the_layout_tokens(pair, tmp_path):
    session = _session(pair, tmp_path)
    processor = session.student_processor
    assert isinstance(session.policy, Emu3ForConditionalGeneration)
    assert (processor.family, processor.codebook_size, processor.num_image_tokens) == ("emu3", 32, T)
    assert torch.equal(processor.codebook(), session.policy.model.vqmodel.quantize.embedding.weight)
    structural = [processor.eol_id, processor.eof_id, processor.eoi_id, processor.eos_id]
    assert session.space.ids.tolist() == processor.visual_ids.tolist() + structural


def test_emu3_samples_keep_the_row_layout_and_decode_to_pictures(pair, tmp_path):
    session = _session(pair, tmp_path)
    processor = session.student_processor
    _, out = _sample(session, session.policy, processor)
    rows = out.tokens[:, :20].view(3, 4, 5)  # [B, h, w+1]
    assert (rows[..., 4] == processor.eol_id).all()
    assert set(rows[..., :4].flatten().tolist()) <= set(processor.visual_ids.tolist())
    assert out.tokens[:, 20:].tolist() == [[processor.eof_id, processor.eoi_id, processor.eos_id]] * 3
    assert (out.logprobs[:, processor.forced >= 0] == 0).all()  # structural tokens are certain
    pictures = session.adapter.decode(out.tokens, out.mask, processor)
    assert [p.size for p in pictures] == [(8, 8)] * 3


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_emu3_teacher_forced_logits_equal_kv_cached_rollout_logits(pair, tmp_path, scale):
    session = _session(pair, tmp_path, **{"teacher.cfg_scale": scale})
    adapter, space = session.adapter, session.space
    prompts, out = _sample(session, session.teacher, session.teacher_processor)
    with torch.no_grad():
        forced = space.restrict(adapter.calls.response_logits(session.teacher, prompts, out.tokens))  # [B, T, A]
        logits, state = adapter.calls.start(session.teacher, prompts)
        cached = [logits]
        for t in range(T - 1):
            logits, state = adapter.calls.step(session.teacher, out.tokens[:, t], state)
            cached.append(logits)
    assert torch.allclose(forced, space.restrict(torch.stack(cached, 1)), atol=1e-4)
    behaviour = forced.log_softmax(-1).gather(-1, space.to_actions(out.tokens)[..., None]).squeeze(-1)
    assert torch.allclose(out.logprobs, behaviour, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_emu3_greedy_rollout_matches_transformers_generate_with_the_layout_constraint(pair, tmp_path, scale):
    session = _session(pair, tmp_path, **{"teacher.cfg_scale": scale})
    processor = session.teacher_processor
    prompts, ours = _sample(session, session.teacher, processor, temperature=0)
    P, forced, visual = prompts.input_ids.shape[1], processor.forced.tolist(), processor.visual_ids.tolist()

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:  # transformers' documented recipe
        t = input_ids.shape[0] - P
        return visual if forced[t] < 0 else [forced[t]]

    guidance = {} if scale == 1.0 else {"guidance_scale": scale, "negative_prompt_ids": prompts.state["uncond_ids"],
                                        "negative_prompt_attention_mask": prompts.state["uncond_mask"]}
    with torch.no_grad():
        theirs = session.teacher.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                          max_new_tokens=T, do_sample=False, prefix_allowed_tokens_fn=allowed,
                                          **guidance)
    assert torch.equal(ours.tokens, theirs[:, P:])


def test_emu3_distillation_step_learns_only_at_visual_positions(pair, tmp_path):
    session = _session(pair, tmp_path, **{"teacher.cfg_scale": 2.0})
    config = session.config
    records = session.train_data.records
    prompts, out = _sample(session, session.policy, session.student_processor)
    t_prompts = session.adapter.encode_prompts(records, session.teacher_processor)
    with torch.no_grad():
        s = session.space.restrict(session.adapter.calls.response_logits(session.policy, prompts, out.tokens))
        t = session.space.restrict(session.adapter.calls.response_logits(session.teacher, t_prompts, out.tokens))
    per_token = token_divergence(s, t)  # [B, T]
    structural = session.student_processor.forced >= 0
    assert (per_token[:, structural] == 0).all() and (per_token[:, ~structural] > 0).all()
    row = objective_step(session.models(), records, Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                         lambda loss: loss.backward())
    assert row["response_tokens"] == 3 * T and row["divergence"] > 0
    assert session.policy.lm_head.weight.grad.abs().sum() > 0


def test_emu3_students_cannot_train_on_target_pictures_yet(pair, tmp_path):
    with pytest.raises(ConfigError, match="Emu3's row layout"):
        _session(pair, tmp_path, **{"objective.kind": "sft"})


def test_emu3_models_that_number_the_visual_tokens_differently_are_refused(pair, tmp_path):
    session = _session(pair, tmp_path)
    student, teacher = session.student_processor, copy.copy(session.teacher_processor)
    teacher.space_ids = teacher.space_ids.flip(0)
    with pytest.raises(IncompatibleModelsError, match="different ids"):
        session.adapter.check_pair(student, teacher, session.policy, session.teacher)
