"""Divergences, losses and engines are registered by name, once. A new divergence is one decorated function:
registered in the tests below, config validation accepts it, the logits and fused kernels both evaluate it, and an
objective step trains with it on the text toy."""

from __future__ import annotations

import pytest
import torch

from mmopd import config as config_module
from mmopd.config import ConfigError
from mmopd.engines import ROLLOUT_ENGINES, TEACHER_ENGINES
from mmopd.losses import (DIVERGENCES, available_divergences, fused_divergence_loss, register_divergence,
                          through_softmax, token_divergence, unregister_divergence)
from mmopd.run.objectives import LOSSES
from mmopd.step.objective_table import REWARD_ONLY, TABLE
from tests.core.test_fused_objective import _assert_fused_step_equals_logits_step


@pytest.fixture
def squared_l2():
    """½ Σ (p_S − p_T)², registered for one test and removed after it."""

    @register_divergence("squared_l2")
    def squared_l2(s, t, beta, need_grads):
        p_s, p_t = s.exp(), t.exp()  # [n, V]
        diff = p_s - p_t  # d value / d p_S; d value / d p_T is its negative
        value = 0.5 * diff.square().sum(-1)
        return (value, through_softmax(p_s, diff) if need_grads[0] else None,
                through_softmax(p_t, -diff) if need_grads[1] else None)

    yield "squared_l2"
    unregister_divergence("squared_l2")


def _logits(rows=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2,
            torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2)


def test_a_registered_divergence_matches_its_formula_in_value_and_gradient(squared_l2):
    student, teacher = (x.requires_grad_() for x in _logits())
    weights = torch.linspace(0.5, 2.0, student.shape[0], dtype=torch.float64)
    temperature = 0.7
    (token_divergence(student, teacher, squared_l2, temperature=temperature, chunk_size=4) * weights).sum().backward()
    got = student.grad, teacher.grad
    student.grad = teacher.grad = None
    p_s, p_t = (torch.softmax(z / temperature, -1) for z in (student, teacher))
    (0.5 * (p_s - p_t).square().sum(-1) * weights).sum().backward()
    torch.testing.assert_close(got[0], student.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], teacher.grad, rtol=1e-5, atol=1e-7)


def test_a_registered_divergence_runs_through_the_fused_kernel(squared_l2):
    g = torch.Generator().manual_seed(1)
    s_hidden = torch.randn(7, 5, generator=g, requires_grad=True)
    s_weight = torch.randn(13, 5, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(7, 5, generator=g), torch.randn(13, 5, generator=g)
    weights = torch.rand(7, generator=g)
    loss, values = fused_divergence_loss(s_hidden, s_weight, t_hidden, t_weight, weights, squared_l2, chunk_size=3)
    loss.backward()
    fused_grads = s_hidden.grad.clone(), s_weight.grad.clone()
    s_hidden.grad = s_weight.grad = None
    exact = token_divergence(s_hidden @ s_weight.T, t_hidden @ t_weight.T, squared_l2)
    (exact * weights).sum().backward()
    torch.testing.assert_close(values, exact.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused_grads, (s_hidden.grad, s_weight.grad), rtol=1e-5, atol=1e-6)


def test_config_validation_accepts_a_registered_divergence_and_the_step_trains_with_it(text_config, squared_l2):
    assert squared_l2 in available_divergences() and squared_l2 in DIVERGENCES
    assert text_config(**{"objective.divergence": squared_l2}).objective.divergence == squared_l2
    _assert_fused_step_equals_logits_step(text_config, **{"objective.divergence": squared_l2,
                                                          "objective.temperature": 0.8})


def test_an_unknown_divergence_is_refused_in_one_line_that_lists_the_registered_ones(text_config, squared_l2):
    student, teacher = _logits()
    with pytest.raises(ValueError) as kernel:
        token_divergence(student, teacher, "hellinger")
    with pytest.raises(ConfigError) as config:
        text_config(**{"objective.divergence": "hellinger"})
    for err in (kernel.value, config.value):
        message = str(err)
        assert "\n" not in message and "'hellinger'" in message
        assert all(name in message for name in ("reverse_kl", "forward_kl", "jsd", "tvd", squared_l2))


def test_registration_is_by_one_name_and_undone_by_unregistering():
    before = available_divergences()
    assert "reverse_kl" in DIVERGENCES and "hellinger" not in DIVERGENCES  # membership answers, never raises
    with pytest.raises(ValueError, match="'reverse_kl' is already registered"):
        register_divergence("reverse_kl")(lambda s, t, beta, need_grads: (s.sum(-1), None, None))
    register_divergence("zero")(lambda s, t, beta, need_grads: (s.sum(-1) * 0, None, None))
    assert available_divergences() == (*before, "zero")
    unregister_divergence("zero")
    assert available_divergences() == before == ("reverse_kl", "forward_kl", "jsd", "tvd")
    with pytest.raises(ValueError, match="unknown divergence kind 'zero'"):
        unregister_divergence("zero")


def test_every_row_of_the_objective_table_names_a_registered_loss_and_every_loss_serves_a_row():
    rows = [*TABLE.values(), REWARD_ONLY]  # REWARD_ONLY: on_policy with objective.kl_weight 0
    assert {row.loss for row in rows} == set(LOSSES) == {"divergence", "sampled", "nll", "policy_gradient"}
    with pytest.raises(ValueError, match="unknown loss 'ppo'; valid ones are divergence, sampled, policy_gradient, "
                       "nll"):
        LOSSES["ppo"]


def test_the_engines_config_accepts_are_the_registered_ones():
    assert config_module.ENGINES == ROLLOUT_ENGINES.names() == TEACHER_ENGINES.names() == ("hf", "vllm")
    with pytest.raises(ConfigError, match="unknown teacher.engine 'sglang'; valid ones are hf, vllm"):
        TEACHER_ENGINES["sglang"]
