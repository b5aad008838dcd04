"""Every experiment runs end to end at the tiny size and writes its plot, results JSON and table."""

from __future__ import annotations

import json

import pytest

from examples.experiments import cfg_distill, compute_matched, estimator, forgetting, mode_seeking


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def test_compute_matched_writes_a_row_and_a_curve_per_method(out):
    result = compute_matched.run(out, "tiny", None)
    assert set(result["methods"]) == set(compute_matched.METHODS)
    assert all(len(c["accuracy"]) >= 2 and c["flops"][-1] > 0 for cs in result["curves"].values() for c in cs)
    assert (out / "results_compute_matched.png").stat().st_size > 0
    assert json.loads((out / "compute_matched.json").read_text())["budget_tflops"] > 0
    assert (out / "compute_matched.md").read_text().count("\n| ") == len(compute_matched.METHODS)  # one row per method


def test_estimator_reuses_the_on_policy_runs_and_adds_top_k(out):
    result = estimator.run(out, "tiny", None)
    assert set(result["methods"]) == {"on_policy_full", "on_policy_sampled", *estimator.EXTRA}
    assert result["methods"]["on_policy_sampled"]["teacher_numbers_per_token"] == 1
    assert (out / "results_estimator.png").stat().st_size > 0


def test_mode_seeking_reports_probabilities_that_sum_to_one(out):
    result = mode_seeking.run(out, "tiny", None)
    for name, values in result["models"].items():
        assert all(abs(sum(v) - 1) < 1e-4 for v in values), name
    assert set(result["models"]) == {"teacher", "student start", *mode_seeking.METHODS}


def test_forgetting_measures_both_tasks_through_the_stages(out):
    result = forgetting.run(out, "tiny", None)
    assert set(result["stage3"]) == set(forgetting.STAGE3)
    assert len(result["stage2"]["a"]) == len(result["stage2"]["b"]) >= 2
    assert (out / "forgetting" / "results_forgetting.png").stat().st_size > 0


def test_cfg_distill_reports_teacher_and_student_per_scale(out):
    from modalities.image_tokens import toy

    steps = toy.TEACHER_STEPS
    result = cfg_distill.run(out, "tiny", None)
    assert set(result["scales"]) == {f"{s:g}" for s in cfg_distill.SIZES["tiny"]["scales"]}
    assert all(r["pictures_per_s"]["student_after"] > 0 for r in result["scales"].values())
    assert toy.TEACHER_STEPS == steps  # the tiny build does not leak its settings
