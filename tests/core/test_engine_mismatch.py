"""Responses sampled by another program: the mismatch of its log-probs with the trainer's is measured, and the
sampled estimator's ratio is left alone (no correction) or truncated at rollout.tis_cap."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mmopd.config import RolloutConfig
from mmopd.engines import EngineError
from mmopd.run.objectives import against_trainer, check_engine
from mmopd.run.session import Session
from mmopd.step.batch import Rollout
from mmopd.step.scores import Logits


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    actions = torch.randint(0, 7, (2, 3), generator=g)
    trainer = logits.log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)  # [B, T]
    engine = trainer + torch.tensor([[0.5, -0.2, 0.0], [3.0, 0.1, 9.0]])  # the engine's own numerics
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return Logits(logits), actions, trainer, Rollout(actions, mask, engine * mask), mask


def test_the_mismatch_and_the_k3_kl_are_measured_on_the_sampled_tokens_only():
    student, actions, trainer, responses, mask = _case()
    metrics = {}
    against_trainer(student, actions, responses, RolloutConfig(), metrics)
    d = (trainer - responses.logprobs)[mask.bool()]  # log p_trainer − log p_engine, the masked-out 9.0 excluded
    assert metrics["rollout/logprob_mismatch"] == pytest.approx(d.abs().mean().item(), rel=1e-6)
    assert metrics["rollout/kl"] == pytest.approx((d.exp() - 1 - d).mean().item(), rel=1e-6)


def test_without_a_cap_the_behaviour_is_the_trainers_own_so_the_ratio_is_one():
    student, actions, trainer, responses, mask = _case()
    behaviour = against_trainer(student, actions, responses, RolloutConfig(), {}).logprobs
    torch.testing.assert_close(behaviour, trainer * mask)


def test_with_a_cap_the_ratio_gains_the_truncated_importance_weight():
    student, actions, trainer, responses, mask = _case()
    cap = 1.5
    behaviour = against_trainer(student, actions, responses, RolloutConfig(tis_cap=cap), {}).logprobs
    weight = torch.exp(trainer - behaviour)[mask.bool()]  # the estimator's ratio exp(log p_S − behaviour) at p_S
    expected = torch.clamp(torch.exp(trainer - responses.logprobs), max=cap)[mask.bool()]
    torch.testing.assert_close(weight, expected)
    assert weight.max().item() <= cap + 1e-6 and math.isclose(weight.min().item(), math.exp(-3.0), rel_tol=1e-5)


def test_a_served_engines_mismatch_names_the_missing_logprobs_mode_flag(text_config):
    """A server started without --logprobs-mode processed_logprobs sends log-probs that differ from the trainer's
    by a few thousandths of a nat: the refusal before step 1 names that flag first."""
    session = Session(text_config())
    models = session.models()
    inner = models.rollout

    class Raw:  # the trainer's own samples, their log-probs off by 0.004 nats, as raw ones are
        exact = False

        def sample(self, prompts, sampling, generator):
            out = inner.sample(prompts, sampling, generator)
            return replace(out, logprobs=(out.logprobs - 0.004) * out.mask)

    models.rollout = Raw()
    served = text_config(**{"rollout.engine": "vllm", "rollout.url": "http://127.0.0.1:8000"})
    with pytest.raises(EngineError, match=r"differ from the trainer's by 0\.004 nats a token .*\. The likeliest cause: "
                                          r"the server at http://127\.0\.0\.1:8000 was started without "
                                          r"--logprobs-mode processed_logprobs"):
        check_engine(models, session.train_data.records[:4], served)
