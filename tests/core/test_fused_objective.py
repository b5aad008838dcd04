"""objective_step scores from hidden states and LM heads exactly as it does from logits, and says when it can't."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmopd.config import ConfigError, ObjectiveConfig
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, HFTeacher, TeacherNeed
from mmopd.losses import fused_divergence_loss
from mmopd.models.adapter import fused_unsupported, prepare_trainable
from mmopd.models.hf import ModelCalls
from mmopd.run.objectives import Plan, Timer, _log_once, objective_step, use_fused
from mmopd.run.session import Session
from mmopd.step.scores import Hidden


def _step_loss_and_grads(session, config, records, seed=0):
    session.policy.zero_grad(set_to_none=True)
    row = objective_step(session.models(), records, Plan.of(config), torch.Generator().manual_seed(seed), Timer(),
                         lambda loss: loss.backward())
    grads = {n: p.grad.clone() for n, p in session.policy.named_parameters() if p.grad is not None}
    return row, grads


def _assert_fused_step_equals_logits_step(text_config, lora=False, **overrides):
    rows, grads = {}, {}
    for fused in ("always", "never"):
        config = text_config(**{"objective.fused": fused, **overrides})
        session = Session(config)
        session.policy.double()
        if session.teacher is not None:
            session.teacher.double()
        if lora:
            torch.manual_seed(0)  # the same LoRA initialisation for both runs
            session.policy = prepare_trainable(session.adapter, session.policy, config.student)
        rows[fused], grads[fused] = _step_loss_and_grads(session, config, session.train_data.records[:4])
    assert rows["always"]["fused"] == 1.0 and rows["never"]["fused"] == 0.0
    if overrides.get("objective.kind", "on_policy") in ("on_policy", "seq_kd"):
        assert rows["always"]["rollout_tokens_per_s"] > 0 and rows["never"]["rollout_tokens_per_s"] > 0
    assert rows["always"]["loss"] == pytest.approx(rows["never"]["loss"], rel=1e-5, abs=1e-6)
    assert grads["always"].keys() == grads["never"].keys() and grads["always"]
    for name in grads["never"]:
        torch.testing.assert_close(grads["always"][name], grads["never"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "tvd"])
def test_fused_on_policy_step_gives_the_logits_step_loss_and_grads(text_config, divergence):
    _assert_fused_step_equals_logits_step(text_config, **{"objective.divergence": divergence,
                                                          "objective.temperature": 0.8})


@pytest.mark.parametrize("kind,estimator", [("on_policy", "sampled"), ("supervised_kd", "full"),
                                            ("seq_kd", "full"), ("sft", "full")])
def test_fused_step_matches_for_every_objective(text_config, kind, estimator):
    _assert_fused_step_equals_logits_step(text_config, **{"objective.kind": kind, "objective.estimator": estimator})


def test_fused_step_matches_with_sft_weight_and_topk_teacher(text_config):
    _assert_fused_step_equals_logits_step(text_config, **{"objective.sft_weight": 0.5, "teacher.top_k": 5})


def test_fused_step_matches_through_a_peft_lora_student(text_config):
    _assert_fused_step_equals_logits_step(text_config, lora=True, **{"student.trainable": "lora",
                                                                      "student.lora_rank": 2})


def test_fused_teacher_scores_equal_the_logits_scores(text_config):
    session = Session(text_config())
    prompts = session.adapter.encode_prompts(session.train_data.records[:3], session.teacher_processor)
    tokens = torch.randint(0, session.space.size, (3, 5), generator=torch.Generator().manual_seed(0))
    fused, plain = (HFTeacher(session.adapter, session.teacher, session.space, fused=f) for f in (True, False))
    logits = plain.score(prompts, tokens, TeacherNeed(DISTRIBUTION)).values  # [B, T, A]
    hidden = fused.score(prompts, tokens, TeacherNeed(DISTRIBUTION))
    assert hidden.weight.shape[0] == session.space.size and not hidden.hidden.is_inference()
    torch.testing.assert_close(torch.nn.functional.linear(hidden.hidden, hidden.weight, hidden.bias), logits,
                               rtol=1e-5, atol=1e-5)
    need = TeacherNeed(TOKEN_LOGPROBS, temperature=0.7)
    torch.testing.assert_close(fused.score(prompts, tokens, need).values, plain.score(prompts, tokens, need).values,
                               rtol=1e-5, atol=1e-5)
    top_fused, top_logits = (engine.score(prompts, tokens, TeacherNeed(TOP_K, k=4)) for engine in (fused, plain))
    torch.testing.assert_close(top_fused.logits, top_logits.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(top_fused.ids, top_logits.ids)


def test_auto_falls_back_to_logits_for_an_adapter_with_its_own_logits_and_always_refuses(text_config, caplog):
    session = Session(text_config())

    class OwnLogits(ModelCalls):
        def response_logits(self, model, prompts, tokens):
            return ModelCalls.response_logits(self, model, prompts, tokens)

    models = session.models()
    models.policy = replace(models.policy, adapter=type(session.adapter)())
    models.adapter.calls = OwnLogits()
    assert fused_unsupported(models.adapter, session.policy) == "the text adapter computes its own response logits"
    _log_once.cache_clear()
    with caplog.at_level("INFO", logger="mmopd"):
        assert use_fused(models, text_config()) is False
    assert "objective.fused=auto scores from logits, not hidden states: student: the text adapter" in caplog.text
    with pytest.raises(ConfigError, match="objective.fused=always, but student: the text adapter"):
        use_fused(models, text_config(**{"objective.fused": "always"}))
    assert use_fused(session.models(), text_config()) is True
    assert use_fused(session.models(), text_config(**{"objective.fused": "never"})) is False


def test_logit_softcapping_models_are_not_fused(text_config):
    session = Session(text_config())
    session.teacher.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in fused_unsupported(session.adapter, session.teacher)
    assert use_fused(session.models(), text_config()) is False


def test_a_head_that_does_not_reproduce_the_models_logits_is_an_error(text_config):
    session = Session(text_config())
    prompts = session.adapter.encode_prompts(session.train_data.records[:2], session.student_processor)
    tokens = torch.ones(2, 3, dtype=torch.long)
    original = session.policy.lm_head.forward
    session.policy.lm_head.forward = lambda x: original(x) + 1.0  # a head transform the fused path cannot see
    with pytest.raises(ValueError, match="set objective.fused=never"):
        session.adapter.calls.response_hidden(session.policy, prompts, tokens)


def test_fused_losses_run_the_head_in_the_dtype_the_models_own_head_ran_in():
    """Under mixed precision (fp32 weights, bf16 logits from the model's forward) the loss's head matmuls are bf16
    too, as they would be in the model's lm_head; with fp32 logits they stay fp32."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    t_hidden, t_weight = torch.randn(2, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    mask = torch.ones(2, 3)
    obj = ObjectiveConfig()
    teacher = Hidden(t_hidden, t_weight, None, torch.float32)

    def loss_with(logits_dtype):
        w = weight.clone().requires_grad_()
        loss = Hidden(hidden, w, None, logits_dtype).divergence(teacher, mask, obj.divergence, obj.beta, obj.temperature)
        return loss.detach(), torch.autograd.grad(loss, w)[0]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = weight.clone().requires_grad_()
        expected = fused_divergence_loss(hidden, w, t_hidden, t_weight, mask / mask.sum())[0]
    expected_grad = torch.autograd.grad(expected, w)[0]
    mixed, mixed_grad = loss_with(torch.bfloat16)
    full, _ = loss_with(torch.float32)
    assert torch.equal(mixed, expected.detach()) and torch.equal(mixed_grad, expected_grad)
    assert not torch.equal(mixed, full)
