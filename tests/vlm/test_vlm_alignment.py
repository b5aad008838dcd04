"""VLM model calls agree with each other and with Hugging Face's own forward: cached sampling over
left-padded image prompts sees the logits a full teacher-forced pass computes, and teacher logits at
response position t are the next-token logits of an unpadded single-row forward that lets the model
compute its own positions (multimodal rope for Qwen-VL)."""

from __future__ import annotations

import pytest
import torch

from mmopd.engines import DISTRIBUTION, HFTeacher, TeacherNeed
from mmopd.engines.hf import rollout
from mmopd.models.adapter import PolicySide, get_adapter
from mmopd.step.batch import Sampling
from modalities.vlm.adapter import TOKEN_ALIGNED
from modalities.vlm.families import FAMILIES

QUESTIONS = ["how many shapes are there?", "what colour is the shape left of the square?"]  # unequal lengths


def _load(vlm_pair, family: str, role: str):
    adapter = get_adapter("vlm")
    path = str(vlm_pair(family)[role])
    return adapter, adapter.load_processor(path, role), adapter.calls.load_model(path, role, torch.float32)


def _records(adapter, vlm_data, images_per_row: tuple[int, ...] = (1, 1)) -> list[dict]:
    base = vlm_data["train"].parent
    return [adapter.check_record({"images": [f"img/train-0000{i + j}.png" for j in range(n)], "prompt": q}, base)
            for i, (q, n) in enumerate(zip(QUESTIONS, images_per_row))]


@pytest.mark.parametrize("family", FAMILIES)
def test_behaviour_logprobs_equal_a_full_forward_over_prompt_and_response(family, vlm_pair, vlm_data):
    adapter, processor, model = _load(vlm_pair, family, "student")
    prompts = adapter.encode_prompts(_records(adapter, vlm_data), processor)
    assert prompts.attention_mask[0, 0] == 0  # the shorter prompt is left-padded
    space = adapter.token_space(processor, model)
    side = PolicySide(adapter, model, processor, space, adapter.eos_token_ids(processor),
                      processor.tokenizer.pad_token_id)
    out = rollout(side, prompts, 6, Sampling(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = space.restrict(adapter.calls.response_logits(model, prompts, out.tokens))  # [B, T, A]
    recomputed = logits.log_softmax(-1).gather(-1, space.to_actions(out.tokens)[..., None]).squeeze(-1)
    assert out.tokens.shape[1] >= 2
    assert torch.allclose(recomputed * out.mask, out.logprobs * out.mask, atol=1e-4)


@pytest.mark.parametrize("family, images_per_row", [(f, (1, 1)) for f in FAMILIES] +
                         [(f, (2, 1)) for f in ("qwen2_5_vl", "qwen3_vl", "smolvlm", "llava", "gemma3")])
def test_teacher_logits_at_t_are_the_next_token_logits_of_an_unpadded_single_row_forward(family, images_per_row,
                                                                                         vlm_pair, vlm_data):
    adapter, processor, teacher = _load(vlm_pair, family, "teacher")
    records = _records(adapter, vlm_data, images_per_row)
    space = adapter.token_space(processor, teacher)
    words = processor.tokenizer.convert_tokens_to_ids(["red", "square", "left", "?"])
    response = torch.tensor([words, words[::-1]])  # [B, T]
    scored = HFTeacher(adapter, teacher, space, fused=False).score(adapter.encode_prompts(records, processor), response,
                                                                  TeacherNeed(DISTRIBUTION)).values
    assert scored.shape == (2, 4, space.size)
    for b, record in enumerate(records):
        single = adapter.encode_prompts([record], processor)  # one row: no padding
        for t in range(response.shape[1]):
            ids = torch.cat([single.input_ids, response[b:b + 1, :t]], dim=1)
            extras = {k: torch.cat([v, v.new_zeros(1, t)], dim=1) if k in TOKEN_ALIGNED else v
                      for k, v in single.model_inputs.items()}
            with torch.no_grad():
                expected = teacher(input_ids=ids, **extras).logits[0, -1]  # the model computes its own positions
            assert torch.allclose(scored[b, t], space.restrict(expected), atol=1e-4), (b, t)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_greedy_rollout_matches_hugging_face_generate(family, vlm_pair, vlm_data):
    adapter, processor, model = _load(vlm_pair, family, "student")
    record = _records(adapter, vlm_data)[1]
    prompts = adapter.encode_prompts([record], processor)
    space = adapter.token_space(processor, model)
    eos = adapter.eos_token_ids(processor)
    side = PolicySide(adapter, model, processor, space, eos, processor.tokenizer.pad_token_id)
    ours = rollout(side, prompts, 6, Sampling(temperature=0))
    rows = model.get_output_embeddings().weight.shape[0]
    bad_words = [[i] for i in sorted(set(range(rows)) - set(space.ids.tolist()))]  # outside the action space
    with torch.no_grad():
        theirs = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, **prompts.model_inputs,
                                max_new_tokens=6, do_sample=False, eos_token_id=eos, bad_words_ids=bad_words,
                                pad_token_id=processor.tokenizer.pad_token_id)[:, prompts.input_ids.shape[1]:]
    n = int(ours.mask.sum())
    assert ours.tokens[0, :n].tolist() == theirs[0, :n].tolist()
