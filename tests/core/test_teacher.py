"""Teacher scoring is aligned to the response: logits at position t score response token t."""

from __future__ import annotations

import pytest
import torch

from mmopd.config import ConfigError
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, HFTeacher, TeacherNeed
from mmopd.run.objectives import teacher_need
from mmopd.run.session import Session
from mmopd.step.scores import TopK, TopKTail


def test_teacher_logits_at_t_are_the_next_token_logits_after_prompt_and_first_t_tokens(text_config):
    session = Session(text_config())
    tok, teacher = session.teacher_processor, session.teacher
    records = [{"prompt": "7+8=", "answer": None}, {"prompt": "123+456=", "answer": None}]
    prompts = session.adapter.encode_prompts(records, tok)
    response = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    scored = HFTeacher(session.adapter, teacher, session.space, fused=False).score(
        prompts, response, TeacherNeed(DISTRIBUTION)).values  # [B, T, A]
    assert scored.shape == (2, 4, session.space.size)
    for b, record in enumerate(records):
        prompt_ids = tok(record["prompt"])["input_ids"]  # unpadded, one row at a time
        for t in range(response.shape[1]):
            ids = torch.tensor([prompt_ids + response[b, :t].tolist()])
            with torch.no_grad():
                expected = teacher(input_ids=ids).logits[0, -1, : session.space.size]
            assert torch.allclose(scored[b, t], expected, atol=1e-4), (b, t)


def test_sampled_teacher_logprobs_are_the_full_logits_gathered_at_the_tokens(text_config):
    session = Session(text_config())
    prompts = session.adapter.encode_prompts(session.train_data.records[:3], session.teacher_processor)
    response = torch.randint(0, session.space.size, (3, 5), generator=torch.Generator().manual_seed(0))
    scorer = HFTeacher(session.adapter, session.teacher, session.space, fused=False)
    full = scorer.score(prompts, response, TeacherNeed(DISTRIBUTION)).values
    sampled = scorer.score(prompts, response, TeacherNeed(TOKEN_LOGPROBS)).values
    assert sampled.shape == (3, 5)
    assert torch.allclose(sampled, full.log_softmax(-1).gather(-1, response[..., None]).squeeze(-1), atol=1e-5)


def test_teacher_is_frozen_and_outputs_carry_no_graph(text_config):
    session = Session(text_config())
    assert not any(p.requires_grad for p in session.teacher.parameters())
    assert not session.teacher.training
    prompts = session.adapter.encode_prompts(session.train_data.records[:2], session.teacher_processor)
    scored = HFTeacher(session.adapter, session.teacher, session.space, fused=False).score(
        prompts, torch.ones(2, 3, dtype=torch.long), TeacherNeed(DISTRIBUTION)).values
    assert scored.grad_fn is None and not scored.is_inference()


@pytest.mark.parametrize("fused", [False, True])
def test_top_k_with_tail_is_the_k_largest_log_probs_over_the_actions(text_config, fused):
    """teacher.tail: the in-process teacher hands over what a served one does, its K largest log-probs (the rest
    of the mass the tail class), here over the action space; without the tail, the K largest logits."""
    session = Session(text_config())
    prompts = session.adapter.encode_prompts(session.train_data.records[:3], session.teacher_processor)
    response = torch.randint(0, session.space.size, (3, 5), generator=torch.Generator().manual_seed(0))
    scorer = HFTeacher(session.adapter, session.teacher, session.space, fused=fused)
    full = HFTeacher(session.adapter, session.teacher, session.space, fused=False).score(
        prompts, response, TeacherNeed(DISTRIBUTION)).values.log_softmax(-1)  # [B, T, A]
    tail = scorer.score(prompts, response, TeacherNeed(TOP_K, k=4, tail=True))
    top = scorer.score(prompts, response, TeacherNeed(TOP_K, k=4))
    assert isinstance(tail, TopKTail) and isinstance(top, TopK)
    expected = full.topk(4, dim=-1)
    torch.testing.assert_close(tail.values, expected.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(tail.ids, expected.indices) and torch.equal(top.ids, expected.indices)
    assert bool(tail.kept().all())


def test_teacher_tail_needs_top_k_and_follows_it_into_the_need(text_config):
    with pytest.raises(ConfigError, match="teacher.tail adds a tail class to the teacher.s top-k; set teacher.top_k"):
        text_config(**{"teacher.tail": True})
    assert teacher_need(text_config(**{"teacher.top_k": 3, "teacher.tail": True})) == TeacherNeed(TOP_K, 3, True)
    assert teacher_need(text_config(**{"teacher.top_k": 3})) == TeacherNeed(TOP_K, 3, False)
