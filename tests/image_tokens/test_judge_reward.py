"""The built-in `judge` reward (objective.reward: judge): each picture's reward is whether the image modality's
judge (the classifier at data.judge) sees its asked class; it trains an image run, and needs a judge."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmopd import train
from mmopd.config import ConfigError
from mmopd.run.session import Session
from mmopd.step.rewards import resolve_reward, rewards_of
from modalities.image_tokens import shapes
from modalities.image_tokens.shapes import to_tensor
from tests.image_tokens.helpers import build_llamagen_task, llamagen_config

pytestmark = pytest.mark.usefixtures("one_thread")
JUDGED = {"objective.reward": "judge", "objective.reward_weight": 1.0, "rollout.samples_per_prompt": 2}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_llamagen_task(tmp_path_factory.mktemp("judge_reward"))


def test_the_judge_reward_is_the_classifiers_per_picture_correctness(task, tmp_path):
    session = Session(llamagen_config(task, tmp_path / "run", **JUDGED))
    pictures, _ = shapes.make_images(8, seed=5)
    with torch.no_grad():
        seen = session.adapter.judge().model(to_tensor(pictures)).argmax(-1).tolist()  # the classifier, directly
    classes = len(shapes.CLASS_NAMES)
    asked = [c if i % 2 == 0 else (c + 1) % classes for i, c in enumerate(seen)]  # right, wrong, right, ...
    records = [{"label": label, "prompt": shapes.CLASS_NAMES[label]} for label in asked]
    reward, _ = resolve_reward("judge")
    rewards = rewards_of(reward, "judge", session.adapter, records, pictures, torch.device("cpu"))
    assert rewards.tolist() == [1.0, 0.0] * 4


def test_a_short_image_run_trains_on_the_judge_reward(task, tmp_path):
    config = llamagen_config(task, tmp_path / "run", **JUDGED, **{"train.steps": 2, "data.eval": ""})
    summary = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert summary["steps"] == 2 and len(steps) == 2
    pictures = config.train.batch_size * 2  # each prompt's two samples
    assert all((r["reward/mean"] * pictures).is_integer() and 0 <= r["reward/mean"] <= 1 for r in steps), steps
    assert all(math.isfinite(r["loss"]) and r["divergence"] > 0 for r in steps)  # the KL beside the reward


@pytest.mark.parametrize("overrides,says", [
    ({**JUDGED, "data.judge": "", "data.eval": ""}, "objective.reward=judge grades each picture with a classifier: "
                                                    "set data.judge"),
    ({**JUDGED, "objective.reward": "exact_match"}, "the image_tokens adapter scores classifier_accuracy. Give judge "),
])
def test_a_reward_the_image_run_cannot_give_is_refused_at_start(task, tmp_path, overrides, says):
    with pytest.raises(ConfigError, match=says):
        Session(llamagen_config(task, tmp_path / "run", **overrides))
