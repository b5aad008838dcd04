"""Every objective trains through the same step: a few updates on a fixed batch lower its loss."""

from __future__ import annotations

import pytest
import torch

from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from mmopd.step.batch import answers_rollout


def _sharpen(teacher: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale the teacher's final norm so its random distributions are peaked: a real target to learn."""
    teacher.model.norm.weight.data.mul_(factor)


@pytest.mark.parametrize("kind,estimator", [
    ("on_policy", "full"), ("on_policy", "sampled"), ("gkd", "full"), ("supervised_kd", "full"),
    ("seq_kd", "full"), ("sft", "full"),
])
def test_a_few_steps_on_a_fixed_batch_lower_the_objective(text_config, kind, estimator):
    config = text_config(**{"objective.kind": kind, "objective.estimator": estimator, "objective.lmbda": 0.5,
                            "objective.divergence": "jsd" if kind == "gkd" else "reverse_kl",
                            "rollout.samples_per_prompt": 4})
    session = Session(config)
    if session.teacher is not None:
        _sharpen(session.teacher)
    models = session.models()
    records = session.train_data.records[:8]
    optimizer = torch.optim.Adam(session.policy.parameters(), lr=3e-3)

    def measure() -> float:
        """The objective's loss, averaged over fixed seeds, without updating."""
        values = []
        for seed in range(4):
            row = objective_step(models, records, Plan.of(config), torch.Generator().manual_seed(seed), Timer(),
                                 lambda loss: None)
            values.append(row["divergence"] if "divergence" in row and estimator == "full" else row["loss"])
        return sum(values) / len(values)

    before = measure()
    for step in range(25):
        objective_step(models, records, Plan.of(config), torch.Generator().manual_seed(100 + step), Timer(),
                       lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad()
    after = measure()
    assert after < 0.7 * before, (before, after)


def test_sampled_estimator_gradient_points_the_same_way_as_the_exact_reverse_kl(text_config):
    """With many samples per prompt, the sampled-token policy gradient aligns with the full gradient."""
    session = Session(text_config(**{"rollout.samples_per_prompt": 64, "rollout.max_new_tokens": 4}))
    _sharpen(session.teacher)
    models = session.models()
    records = session.train_data.records[:2]
    grads = {}
    for estimator in ("full", "sampled"):
        config = text_config(**{"objective.estimator": estimator, "rollout.samples_per_prompt": 64,
                                "rollout.max_new_tokens": 4})
        session.policy.zero_grad()
        objective_step(models, records, Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                       lambda l: l.backward())
        grads[estimator] = torch.cat([p.grad.flatten() for p in session.policy.parameters() if p.grad is not None])
    cosine = torch.nn.functional.cosine_similarity(grads["full"], grads["sampled"], dim=0)
    assert cosine > 0.5, cosine


def test_answers_become_right_padded_responses_ending_in_their_own_length():
    out = answers_rollout([[5, 6, 2], [7, 2]], pad_id=0, device=torch.device("cpu"))
    assert out.tokens.tolist() == [[5, 6, 2], [7, 2, 0]]
    assert out.mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_sft_weight_adds_the_answers_nll_to_the_on_policy_loss(text_config):
    config = text_config(**{"objective.sft_weight": 0.5})
    session = Session(config)
    row = objective_step(session.models(), session.train_data.records[:4], Plan.of(config),
                         torch.Generator().manual_seed(0), Timer(), lambda loss: None)
    assert row["loss"] == pytest.approx(row["divergence"] + 0.5 * row["sft_nll"], rel=1e-5)
