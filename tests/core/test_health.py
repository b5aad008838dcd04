"""Sample health: the three numbers on hand-made token tensors, the one-line warnings (once per kind, only when a
threshold is crossed), and a run whose collapse warning lands in summary.json and the end table."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import mmopd
from mmopd.config import ConfigError
from mmopd.run.report import format_table, read_metrics
from mmopd.step.health import (ENTROPY, LENGTH, REPEAT, SURPRISAL, HealthMonitor, repeat_share, sample_health,
                               token_entropy)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.tensor([[5, 5, 6, 7], [5, 9, 9, 9]])  # [2, 4]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float)  # kept: 5 5 6 | 5 9


def test_token_entropy_is_that_of_the_masked_tokens_pooled_over_the_batch():
    p = torch.tensor([3 / 5, 1 / 5, 1 / 5])  # 5 three times, 6 and 9 once; the masked 7 and 9s do not count
    assert token_entropy(TOKENS, MASK) == pytest.approx(float(-(p * p.log()).sum()))
    assert token_entropy(torch.full((2, 4), 3), torch.ones(2, 4)) == 0.0  # one repeated token


def test_repeat_share_counts_tokens_that_complete_an_earlier_trigram_of_their_own_response():
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3, 1], [4, 4, 4, 4, 4, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]], dtype=torch.float)
    # row 0: (1,2,3) (2,3,1) (3,1,2) new, then (1,2,3) (2,3,1) again: 2 of 7; row 1: (4,4,4) then twice again: 2 of 5
    assert repeat_share(tokens, mask) == pytest.approx(4 / 12)
    assert repeat_share(torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.ones(2, 3)) == 0.0  # across rows is no repeat


def test_length_ratio_is_the_mean_response_length_over_max_new_tokens():
    health = sample_health(TOKENS, MASK, torch.zeros(2, 4), max_new_tokens=5)
    assert health[LENGTH] == pytest.approx((3 + 2) / 2 / 5)
    assert set(health) == {ENTROPY, REPEAT, LENGTH, SURPRISAL}


def test_surprisal_is_the_mean_negative_log_prob_of_the_kept_sampled_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -50.0], [-0.5, -0.5, -50.0, -50.0]])  # masked ones do not count
    assert sample_health(TOKENS, MASK, logprobs, 4)[SURPRISAL] == pytest.approx((1 + 2 + 3 + 0.5 + 0.5) / 5)


def row(entropy=3.0, repeat=0.0, length=0.3):
    return {ENTROPY: entropy, REPEAT: repeat, LENGTH: length}


def test_the_monitor_warns_once_per_kind_in_one_line_that_says_what_to_try(caplog):
    monitor = HealthMonitor(min_entropy=0.5, max_repeat=0.5, max_length=0.95, can_end=True)
    with caplog.at_level(logging.WARNING, logger="mmopd"):
        assert monitor.check(1, row()) == []
        new = monitor.check(2, row(entropy=0.1, repeat=0.8, length=1.0))
        assert monitor.check(3, row(entropy=0.0, repeat=0.9, length=1.0)) == []  # each kind once
    assert [w["kind"] for w in monitor.warnings] == ["low_entropy", "repetition", "runaway_length"]
    assert [w["step"] for w in monitor.warnings] == [2, 2, 2]
    assert len(new) == 3 and all("\n" not in m and "seq_kd" in m and "train.lr" in m for m in new)
    assert "from 30% to 100%" in new[2]
    assert len(caplog.records) == 3


def test_the_monitor_stays_quiet_on_healthy_samples_and_on_lengths_fixed_from_the_start():
    monitor = HealthMonitor(min_entropy=0.5, max_repeat=0.5, max_length=0.95, can_end=True)
    for step in range(1, 4):
        monitor.check(step, row(length=1.0))  # never below the limit: untrained, not a runaway
    fixed = HealthMonitor(min_entropy=0.5, max_repeat=0.5, max_length=0.95, can_end=False)
    fixed.check(1, row(length=0.5))
    fixed.check(2, row(length=1.0))  # responses that cannot end (pictures) have their length by design
    off = HealthMonitor(min_entropy=0.0, max_repeat=1.0, max_length=1.0, can_end=True)
    off.check(1, row(length=0.1))
    off.check(2, row(entropy=0.0, repeat=1.0, length=1.0))
    assert monitor.warnings == fixed.warnings == off.warnings == []
    assert monitor.check(4, {"loss": 1.0}) == []  # a step on samples that are not the student's


def test_every_on_policy_step_logs_sample_health(text_config, tmp_path):
    mmopd.train(text_config())
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r[ENTROPY] > 0 and 0 <= r[REPEAT] <= 1 and 0 < r[LENGTH] <= 1 and r[SURPRISAL] > 0


def test_a_forced_collapse_warning_lands_in_summary_json_and_the_end_table(text_config, tmp_path):
    summary = mmopd.train(text_config(**{"train.health_min_entropy": 50.0}))  # no batch has 50 nats
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [w["kind"] for w in saved["health_warnings"]] == ["low_entropy"]
    assert saved["health_warnings"][0]["step"] == 1
    assert "sample health warning (low_entropy)" in format_table(summary)


def test_a_healthy_run_records_no_warning(text_config, tmp_path):
    summary = mmopd.train(text_config())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["health_warnings"] == []
    assert "sample health warning" not in format_table(summary)


@pytest.mark.parametrize("key, value, says", [
    ("train.health_min_entropy", -1, "must be >= 0"),
    ("train.health_max_repeat", 0, r"must lie in \(0, 1\]"),
    ("train.health_max_length", 1.5, r"must lie in \(0, 1\]"),
    ("train.eval_kl_prompts", -2, "must be >= 0"),
])
def test_bad_health_settings_are_refused_at_the_config_edge(text_config, key, value, says):
    with pytest.raises(ConfigError, match=says):
        text_config(**{key: value})


def test_a_misspelt_health_key_names_the_right_one(text_config):
    with pytest.raises(ConfigError, match="did you mean 'train.health_min_entropy'"):
        text_config(**{"train.health_min_entropi": 1.0})


def test_health_numbers_are_finite_on_empty_responses():
    health = sample_health(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3), 3)
    assert all(math.isfinite(v) for v in health.values()) and health[LENGTH] == 0.0
