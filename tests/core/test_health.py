"""Sample health: the three numbers on hand-made token tensors, the one-line warnings (once per kind, only when a
threshold is crossed), the check relative to the teacher's samples, and runs whose warnings land in summary.json
and the end table, across a resume too."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import mmopd
from mmopd.config import ConfigError
from mmopd.models.checkpoint import load_trainer_state
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
    ("train.health_min_entropy_ratio", -0.1, r"must lie in \[0, 1\)"),
    ("train.health_min_entropy_ratio", 1.0, r"must lie in \[0, 1\)"),
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


def uniform_batch(vocab: int, seed: int) -> dict[str, float]:
    """The health numbers of 8 responses of 24 tokens drawn uniformly from `vocab` tokens."""
    tokens = torch.randint(vocab, (8, 24), generator=torch.Generator().manual_seed(seed))  # [8, 24]
    return sample_health(tokens, torch.ones(8, 24), torch.zeros(8, 24), max_new_tokens=32)


def test_number_soup_warns_against_the_teachers_entropy_and_passes_the_absolute_checks(caplog):
    soup, teacher = uniform_batch(10, 0), uniform_batch(5000, 1)  # ten digits; a teacher's varied text
    assert soup[ENTROPY] == pytest.approx(2.3, abs=0.05) and teacher[ENTROPY] > 5.1  # as the Gemma runs had them
    assert soup[REPEAT] < 0.1  # few exact repeats: the loop check cannot see it
    absolute = HealthMonitor(min_entropy=0.5, max_repeat=0.5, max_length=0.95, can_end=True)
    monitor = HealthMonitor(min_entropy=0.5, max_repeat=0.5, max_length=0.95, can_end=True, min_entropy_ratio=0.5,
                            teacher_entropy=teacher[ENTROPY])
    with caplog.at_level(logging.WARNING, logger="mmopd"):
        absolute.check(1, soup)
        assert monitor.check(1, uniform_batch(5000, 2)) == []  # a student near the teacher's entropy
        new = monitor.check(2, soup)
        assert monitor.check(3, soup) == []  # once
    assert absolute.warnings == []
    assert [(w["kind"], w["step"]) for w in monitor.warnings] == [("low_entropy_vs_teacher", 2)]
    assert monitor.warnings[0]["threshold"] == pytest.approx(0.5 * teacher[ENTROPY])
    assert len(new) == 1 and "\n" not in new[0] and "objective.sft_weight" in new[0] and "train.lr" in new[0]
    assert f"of the teacher's {teacher[ENTROPY]:.2f}" in new[0] and len(caplog.records) == 1


def test_the_relative_check_is_off_at_ratio_zero_and_without_a_teachers_entropy():
    soup = uniform_batch(10, 0)
    off = HealthMonitor(0.5, 0.5, 0.95, True, min_entropy_ratio=0.0, teacher_entropy=5.0)
    unmeasured = HealthMonitor(0.5, 0.5, 0.95, True, min_entropy_ratio=0.5, teacher_entropy=None)
    off.check(1, soup)
    unmeasured.check(1, soup)
    assert off.warnings == unmeasured.warnings == []


def test_a_run_measures_the_teachers_entropy_once_and_records_the_relative_warning(text_config, tmp_path, caplog,
                                                                                 monkeypatch):
    from mmopd.run import trainer
    measured = []
    real = trainer.teacher_sample_entropy

    def teacher_entropy(*args):  # the real measurement, scaled past any student's: the warning must fire
        measured.append(real(*args))
        return 100 * measured[-1]

    monkeypatch.setattr(trainer, "teacher_sample_entropy", teacher_entropy)
    with caplog.at_level(logging.INFO, logger="mmopd"):
        summary = mmopd.train(text_config())
    assert len(measured) == 1 and measured[0] > 0
    assert sum("the teacher's own samples have a token entropy" in r.getMessage() for r in caplog.records) == 1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(w["kind"], w["step"]) for w in saved["health_warnings"]] == [("low_entropy_vs_teacher", 1)]
    assert "sample health warning (low_entropy_vs_teacher)" in format_table(summary)


def test_a_resumed_run_keeps_the_earlier_segments_warnings_without_repeating_them(text_config, tmp_path, caplog,
                                                                                monkeypatch):
    from mmopd.run import trainer
    calls = []
    monkeypatch.setattr(trainer, "teacher_sample_entropy", lambda *args: calls.append(args) or 1.0)
    collapsing = {"train.health_min_entropy": 50.0}  # every step warns: the first segment's step 1 must stand
    mmopd.train(text_config(**collapsing, **{"train.steps": 1}))
    state = load_trainer_state(tmp_path / "run" / "checkpoints" / "step-1")["health"]
    assert [w["step"] for w in state["warnings"]] == [1] and state["teacher_entropy"] == 1.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmopd"):
        summary = mmopd.train(text_config(**collapsing, **{"train.steps": 2}))  # resumes at step 1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(w["kind"], w["step"]) for w in saved["health_warnings"]] == [("low_entropy", 1)]
    assert summary["health_warnings"] == saved["health_warnings"]
    assert len(calls) == 1  # the resumed segment reads the teacher's entropy from the checkpoint
    assert any("the teacher's own samples have a token entropy of 1.00" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno == logging.WARNING and "sample health" in r.getMessage() for r in caplog.records)
    mmopd.train(text_config(**collapsing, **{"train.steps": 3, "rollout.temperature": 0.7,
                                             "train.resume_changes": ["rollout.temperature"]}))
    assert len(calls) == 2  # another temperature: the teacher's samples are measured again


def test_a_teacher_outside_this_process_is_said_once_and_the_relative_check_skipped(text_config, caplog):
    from types import SimpleNamespace

    from mmopd.run.objectives import Plan
    from mmopd.run.trainer import _health_monitor
    config = text_config(**{"teacher.engine": "vllm", "teacher.url": "http://127.0.0.1:8001"})
    served = SimpleNamespace(eos_ids=[1], teacher=object(), teacher_in_process=False, teachers={},
                             cross_tokenizer=False)  # a vLLM teacher: its weights are in its engine
    with caplog.at_level(logging.INFO, logger="mmopd"):
        health = _health_monitor(config, served, None, Plan.of(config), SimpleNamespace(main=True), {})
    assert health.teacher_entropy is None and health.min_entropy_ratio == 0.5
    said = [r.getMessage() for r in caplog.records if "sample health" in r.getMessage()]
    assert len(said) == 1 and "teacher.engine=vllm holds the teacher's weights" in said[0]
    assert "not checked against the teacher's samples (train.health_min_entropy_ratio)" in said[0]
