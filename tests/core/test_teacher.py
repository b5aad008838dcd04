"""Teacher scoring is aligned to the response: logits at position t score response token t."""

from __future__ import annotations

import torch

from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, HFTeacher, TeacherNeed
from mmopd.session import Session


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
