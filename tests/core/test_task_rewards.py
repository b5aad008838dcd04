"""A task reward in the per-token advantage (objective.reward): A_t = −kl_weight·k_t + reward_weight·(R − b),
checked against a direct computation for both estimators; reward_weight 0 changes nothing; a reward function
that fails stops the run naming the record; a bad reward is refused when the config loads."""

from __future__ import annotations

import math

import pytest
import torch

from mmopd.cli import main
from mmopd.config import ConfigError, save_config
from mmopd.run.objectives import Plan, Timer, divergence_loss, objective_step, reward_only_loss, sampled_loss
from mmopd.run.session import Session
from mmopd.step.batch import Rollout
from mmopd.step.objective_table import POLICY_GRADIENT, needs_teacher, scores_teacher
from mmopd.step.rewards import RewardError, reward_metrics
from mmopd.step.scores import Logits, TokenLogprobs

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, V, GROUP = 4, 3, 5, 2
REWARDS = [1.0, 0.0, 0.5, 0.5]  # prompt 0: its samples differ; prompt 1: all equal (advantage 0 with a baseline)
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]


# the users' reward functions the tests name by import path (tests.core.test_task_rewards:NAME)
def raises(records, responses):
    raise ValueError("no grader for this one")


def nan_on_second(records, responses):
    return [math.nan if i == 1 else 0.0 for i in range(len(responses))]


def one_short(records, responses):
    return [0.0] * (len(responses) - 1)


def length(records, responses):
    return [float(len(r)) for r in responses]


NOT_CALLABLE = 3


def _batch(seed: int = 0):
    """A fixed small batch: the student's logits (a leaf), the teacher's, sampled actions and their mask."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    actions = torch.randint(V, (B, T), generator=g)
    return student, teacher, actions, torch.tensor(MASK, dtype=torch.float64)


def _advantage(baseline: bool, scale: bool) -> torch.Tensor:
    """Â = (R − b) / (σ + 1e-6) per row, by hand: b the mean of the prompt's two rewards, σ their unbiased std."""
    out = []
    for p in range(B // GROUP):
        rs = REWARDS[p * GROUP:(p + 1) * GROUP]
        mean = sum(rs) / GROUP if baseline else 0.0
        std = math.sqrt(sum((r - sum(rs) / GROUP) ** 2 for r in rs) / (GROUP - 1))
        out += [(r - mean) / (std + 1e-6) if scale else r - mean for r in rs]
    return torch.tensor(out, dtype=torch.float64)


def _config(text_config, baseline: str, scale: bool, estimator: str):
    """kl_weight 0.7, reward_weight 2."""
    return text_config(**{"objective.reward": "exact_match", "objective.reward_weight": 2.0,
                          "objective.kl_weight": 0.7, "objective.reward_baseline": baseline,
                          "objective.reward_std": scale, "objective.estimator": estimator,
                          "rollout.samples_per_prompt": GROUP})


SHAPES = [("group", True), ("group", False), ("none", False)]


@pytest.mark.parametrize("baseline,scale", SHAPES)
def test_sampled_advantage_is_minus_kl_weight_k_plus_reward_weight_times_centred_reward(text_config, baseline, scale):
    config = _config(text_config, baseline, scale, "sampled")
    logits, teacher, actions, mask = _batch()
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)  # [B, T]
    t_logp = torch.log_softmax(teacher, -1).gather(-1, actions[..., None]).squeeze(-1)
    responses = Rollout(actions, mask, logp.detach(), torch.tensor(REWARDS, dtype=torch.float64))
    loss, values = sampled_loss(Logits(logits), TokenLogprobs(t_logp), actions, responses, config)
    grad = torch.autograd.grad(loss, logits)[0]

    k = (logp - t_logp).detach()  # the sampled reverse-KL term
    advantage = -0.7 * k + 2.0 * _advantage(baseline == "group", scale)[:, None]  # [B, T]
    direct = -(advantage * logp * mask).sum() / mask.sum()  # REINFORCE with the advantage, on-policy
    assert torch.allclose(grad, torch.autograd.grad(direct, logits)[0], atol=1e-6)
    assert loss.item() == pytest.approx((-(advantage * mask).sum() / mask.sum()).item(), abs=1e-6)  # ρ = 1
    assert values["divergence"] == pytest.approx(((k * mask).sum() / mask.sum()).item(), abs=1e-6)


@pytest.mark.parametrize("baseline,scale", SHAPES)
def test_full_estimator_adds_the_rewards_policy_gradient_to_the_weighted_exact_kl(text_config, baseline, scale):
    config = _config(text_config, baseline, scale, "full")
    logits, teacher, actions, mask = _batch(1)
    responses = Rollout(actions, mask, torch.zeros(B, T), torch.tensor(REWARDS, dtype=torch.float64))
    loss, values = divergence_loss(Logits(logits), Logits(teacher), actions, responses, config)

    p_s, log_s, log_t = logits.softmax(-1), logits.log_softmax(-1), teacher.log_softmax(-1)
    kl = (p_s * (log_s - log_t)).sum(-1)  # [B, T] KL(S‖T) per position
    logp = log_s.gather(-1, actions[..., None]).squeeze(-1)
    pg = -(2.0 * _advantage(baseline == "group", scale)[:, None] * logp * mask).sum() / mask.sum()
    direct = 0.7 * (kl * mask).sum() / mask.sum() + pg
    assert loss.item() == pytest.approx(direct.item(), abs=1e-6)
    assert torch.allclose(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(direct, logits)[0], atol=1e-6)
    assert values["divergence"] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), abs=1e-6)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_kl_weight_zero_is_plain_on_policy_rl_without_a_teacher(text_config, estimator):
    config = text_config(**{"objective.reward": "exact_match", "objective.reward_weight": 1.5,
                            "objective.kl_weight": 0, "objective.estimator": estimator, "teacher.path": "",
                            "rollout.samples_per_prompt": GROUP})
    o = config.objective
    assert not needs_teacher(o.kind, o.estimator, o.kl_weight) and not scores_teacher(o.kind, o.estimator, 0)
    assert Plan.of(config).row.loss == POLICY_GRADIENT and Plan.of(config).row.teacher is None
    logits, _, actions, mask = _batch(2)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    responses = Rollout(actions, mask, logp.detach(), torch.tensor(REWARDS, dtype=torch.float64))
    loss, _ = reward_only_loss(Logits(logits), None, actions, responses, config)
    direct = -(1.5 * _advantage(True, False)[:, None] * logp * mask).sum() / mask.sum()
    assert torch.allclose(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(direct, logits)[0], atol=1e-6)
    assert Session(config).teacher is None


def _step(session, config, seed=0):
    session.policy.zero_grad(set_to_none=True)
    row = objective_step(session.models(), session.train_data.records[:2], Plan.of(config),
                         torch.Generator().manual_seed(seed), Timer(), lambda loss: loss.backward())
    return row, {n: p.grad.clone() for n, p in session.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_reward_weight_zero_leaves_the_loss_bitwise_unchanged_and_logs_the_reward(text_config, estimator):
    plain = text_config(**{"objective.estimator": estimator, "rollout.samples_per_prompt": GROUP})
    logged = text_config(**{"objective.estimator": estimator, "rollout.samples_per_prompt": GROUP,
                            "objective.reward": "tests.core.test_task_rewards:length"})
    (row, grads), (row_r, grads_r) = _step(Session(plain), plain), _step(Session(logged), logged)
    assert row_r["loss"] == row["loss"] and row_r["divergence"] == row["divergence"]
    assert grads.keys() == grads_r.keys() and all(torch.equal(grads[n], grads_r[n]) for n in grads)
    assert "reward/mean" not in row and row_r["reward/mean"] > 0  # the responses' lengths in characters


def test_reward_metrics_are_mean_std_and_the_share_of_prompts_whose_samples_agree():
    metrics = reward_metrics(torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 1.0]), 2)
    assert metrics["reward/mean"] == pytest.approx(4 / 6)
    assert metrics["reward/std"] == pytest.approx(torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 1.0]).std(unbiased=False))
    assert metrics["reward/all_equal_share"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name,says", [
    ("raises", r"raised on record .*train\.jsonl:1 \(response .*\): ValueError: no grader for this one"),
    ("nan_on_second", r"returned nan for record .*train\.jsonl:1, sample 1 .*a finite number"),
    ("one_short", r"returned 3 values for 4 responses \(records .*train\.jsonl:1"),
])
def test_a_reward_function_that_fails_stops_the_step_naming_the_record(text_config, name, says):
    config = text_config(**{"objective.reward": f"tests.core.test_task_rewards:{name}",
                            "objective.reward_weight": 1.0, "rollout.samples_per_prompt": GROUP})
    with pytest.raises(RewardError, match=says):
        _step(Session(config), config)


def test_a_failing_reward_stops_the_run_with_one_line(text_config, tmp_path, capsys):
    config = text_config(**{"objective.reward": "tests.core.test_task_rewards:raises", "objective.reward_weight": 1.0,
                            "rollout.samples_per_prompt": GROUP, "train.steps": 1})
    save_config(config, tmp_path / "config.yaml")
    assert main(["train", str(tmp_path / "config.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmopd: stopped: objective.reward 'tests.core.test_task_rewards:raises' raised on record ")


@pytest.mark.parametrize("reward,says", [
    ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
    ("tests.core.test_task_rewards:missing", "has no 'missing'"),
    ("tests.core.test_task_rewards:NOT_CALLABLE", "is a int, not a function"),
    ("exact_mach", "unknown objective.reward 'exact_mach'; valid ones are exact_match"),
    ("tests.core.test_task_rewards:", "must be a built-in"),
])
def test_a_bad_reward_is_refused_when_the_config_loads(text_config, reward, says):
    with pytest.raises(ConfigError, match=says) as err:
        text_config(**{"objective.reward": reward, "objective.reward_weight": 1.0, "rollout.samples_per_prompt": 2})
    assert "\n" not in str(err.value)


def test_the_judge_reward_for_text_is_refused_before_training_in_one_line(text_config, tmp_path, capsys):
    config = text_config(**{"objective.reward": "judge", "objective.reward_weight": 1.0,
                            "rollout.samples_per_prompt": GROUP, "train.steps": 1})
    save_config(config, tmp_path / "config.yaml")
    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("mmopd: error: objective.reward=judge grades each response with the modality's judge (a "
                    "classifier); the text adapter has none (image_tokens has). Give exact_match or a module:function "
                    "reward instead")]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("overrides,says", [
    ({"objective.reward_weight": 1.0}, "objective.reward is empty"),
    ({"objective.reward": "exact_match", "objective.reward_weight": 1.0}, "samples_per_prompt >= 2"),
    ({"objective.kl_weight": 0}, "leaves nothing to train"),
    ({"objective.reward": "exact_match", "objective.kind": "sft"}, "needs objective.kind=on_policy"),
    ({"objective.reward": "exact_match", "objective.reward_std": True, "objective.reward_baseline": "none"},
     "needs objective.reward_baseline=group"),
    ({"objective.reward": "exact_match", "objective.reward_weight": 1.0, "objective.kl_weight": 0,
      "rollout.samples_per_prompt": 2, "objective.estimator": "sampled", "objective.baseline": "batch"},
     "shapes the KL term"),
])
def test_reward_settings_that_cannot_train_are_refused(text_config, overrides, says):
    with pytest.raises(ConfigError, match=says):
        text_config(**overrides)
