"""The objectives table decides what each objective needs; the config refuses what the table lacks."""

from __future__ import annotations

import pytest

from mmopd.config import ConfigError, load_config
from mmopd.step.objective_table import TABLE, needs_answers, needs_teacher, scores_teacher

REQUIRED = {"student.path": "s", "teacher.path": "t", "data.train": "train.jsonl"}


@pytest.mark.parametrize("kind,estimator,teacher,scored,answers", [
    ("on_policy", "full", True, True, False),
    ("on_policy", "sampled", True, True, False),
    ("gkd", "full", True, True, False),
    ("supervised_kd", "full", True, True, True),
    ("seq_kd", "full", True, False, False),
    ("sft", "full", False, False, True),
])
def test_each_row_says_what_the_objective_needs(kind, estimator, teacher, scored, answers):
    assert needs_teacher(kind, estimator) is teacher
    assert scores_teacher(kind, estimator) is scored
    assert needs_answers(kind, estimator, lmbda=1.0, sft_weight=0.0) is answers


def test_gkd_below_lambda_one_and_any_sft_weight_need_answers():
    assert needs_answers("gkd", "full", lmbda=0.5, sft_weight=0.0)
    assert all(needs_answers(kind, estimator, lmbda=1.0, sft_weight=0.1) for kind, estimator in TABLE)


@pytest.mark.parametrize("kind", ["gkd", "supervised_kd", "seq_kd", "sft"])
def test_the_sampled_estimator_outside_on_policy_is_refused_not_ignored(kind):
    with pytest.raises(ConfigError, match=f"objective.estimator=sampled does not apply to objective.kind={kind}; use full"):
        load_config(None, {**REQUIRED, "objective.kind": kind, "objective.estimator": "sampled"})


@pytest.mark.parametrize("key", ["rollout.engine", "teacher.engine"])
def test_an_unknown_engine_is_a_config_error_naming_the_choices(key):
    assert getattr(load_config(None, REQUIRED), key.split(".")[0]).engine == "hf"
    with pytest.raises(ConfigError, match=f"{key} is 'sglang', which is not one of hf"):
        load_config(None, {**REQUIRED, key: "sglang"})


def test_sft_needs_no_teacher_path():
    config = load_config(None, {"student.path": "s", "data.train": "t.jsonl", "objective.kind": "sft"})
    assert config.teacher.path == ""
