"""Every experiment runs end to end at the tiny size and writes its plot, results JSON and table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
import yaml

from experiments import (cfg_distill, compute_matched, estimator, estimator_tail, forgetting, mode_seeking,
                         moe_routing, privileged_teacher, published_regime, sampled_estimator, self_distill,
                         sparse_teacher, task_rewards)
from experiments.text_task import step_flops


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


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["vlm", "image"])
def test_compute_matched_runs_every_method_on_the_vlm_and_image_toys(out, modality):
    result = compute_matched.run_modality(out, "tiny", None, modality)
    long = {f"{name}_long" for name in compute_matched.MODALITIES[modality]["long"]}
    assert set(result["methods"]) == {*compute_matched.METHODS, *long}
    assert result["modality"] == modality and result["metric"] in ("accuracy", "classifier_accuracy")
    assert all(c["flops"][-1] > 0 for cs in result["curves"].values() for c in cs)
    assert (out / f"results_compute_matched_{modality}.png").stat().st_size > 0
    task = json.loads((out / f"{modality}_toy" / "task.json").read_text())
    assert task["teacher_rows"] == (2 if modality == "image" else 1)  # the image toy's teacher is CFG-guided
    assert (task["vision_flops"]["student"] > 0) == (modality == "vlm")
    assert ("dataset_through_vq" in result) == (modality == "image")
    if modality == "image":
        assert 0 <= result["dataset_through_vq"]["classifier_accuracy"] <= 1
        assert "through the VQ score" in (out / "compute_matched_image.md").read_text()
        lower = result["lower_temperature"]["methods"]  # every short method's final students, sampled again
        assert set(lower) == set(compute_matched.METHODS) and all(len(v) == result["seeds"] for v in lower.values())


def test_matched_steps_give_every_method_at_least_the_on_policy_budget():
    task = {"params": {"student": 100, "teacher": 400, "student_trainable": 60}, "prompt_tokens": 3.0,
            "vision_flops": {"student": 50.0, "teacher": 50.0}, "teacher_rows": 2}
    steps = compute_matched.matched_steps(task, budget_steps=100, batch_size=8, response_tokens=5.0)
    row = {"response_tokens": 8 * 5.0}

    def cost(name: str) -> float:
        overrides = compute_matched.METHODS[name][0]
        kind = overrides["objective.kind"]
        if kind == "gkd":
            return steps[name] * (step_flops({**row, "on_policy": 1.0}, kind, task, 8) +
                                  step_flops(row, kind, task, 8)) / 2
        return steps[name] * step_flops({**row, "on_policy": float(kind == "on_policy")}, kind, task, 8)

    budget = cost("on_policy_full")
    assert steps["on_policy_full"] == 100
    for name in compute_matched.METHODS:
        assert budget <= cost(name) < budget + 10 * cost(name) / steps[name], name  # rounded up to 10 steps
    assert steps["sft"] > steps["supervised_kd"] > steps["on_policy_full"]  # no teacher, then no generation


def test_step_flops_charge_a_guided_teacher_two_rows_and_a_frozen_tower_no_backward():
    base = {"params": {"student": 10, "teacher": 20}, "prompt_tokens": 1.0}
    row = {"response_tokens": 3.0}  # batch 1: 4 tokens
    assert step_flops(row, "supervised_kd", base, 1) == 6 * 10 * 4 + 2 * 20 * 4
    guided = {**base, "teacher_rows": 2}
    assert step_flops(row, "supervised_kd", guided, 1) == 6 * 10 * 4 + 2 * 2 * 20 * 4
    vlm = {**base, "params": {"student": 10, "teacher": 20, "student_trainable": 5},
           "vision_flops": {"student": 7.0, "teacher": 9.0}}
    assert step_flops(row, "sft", vlm, 1) == 2 * 10 * 4 + 7 + 4 * 5 * 4
    generated_and_trained = 2 * (2 * 10 * 4 + 7) + 4 * 5 * 4
    assert step_flops({**row, "on_policy": 1.0}, "on_policy", vlm, 1) == generated_and_trained + 2 * 20 * 4 + 9


def test_estimator_reuses_the_on_policy_runs_and_adds_top_k(out):
    result = estimator.run(out, "tiny", None)
    assert set(result["methods"]) == {"on_policy_full", "on_policy_sampled", *estimator.EXTRA}
    assert result["methods"]["on_policy_sampled"]["teacher_numbers_per_token"] == 1
    assert (out / "results_estimator.png").stat().st_size > 0


@pytest.mark.slow
def test_estimator_tail_runs_top_k_with_a_tail_beside_the_exact_teacher_on_the_three_toys(out):
    result = estimator_tail.run(out, "tiny", None)
    assert list(result["toys"]) == list(estimator_tail.TOYS)
    for toy, r in result["toys"].items():
        assert set(r["methods"]) == {"on_policy_full", estimator_tail.TAIL}, toy
    run_dir = out / "compute_matched_image" / "runs" / estimator_tail.TAIL / "seed0"  # compute_matched's folders
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["teacher"]["top_k"] == estimator_tail.K and config["teacher"]["tail"] is True
    assert (out / "results_estimator_tail.png").stat().st_size > 0
    assert (out / "estimator_tail.md").read_text().count("\n| ") == 2 * len(estimator_tail.TOYS)


def test_sampled_estimator_runs_every_remedy_the_sweep_and_the_gradient_study(out):
    result = sampled_estimator.run(out, "tiny", None)
    assert set(result["methods"]) == {"on_policy_full", "on_policy_sampled", *sampled_estimator.VARIANTS}
    assert set(result["winners"]) <= set(result["methods"]) - {"on_policy_full"}
    assert all(r["tflops_total"][0] > 0 for r in result["methods"].values())
    batch = sampled_estimator.SIZES["tiny"]["batch_size"]
    assert {estimator: list(rows) for estimator, rows in result["sweep"].items()} == \
        {estimator: [str(times * batch) for times in (1, *sampled_estimator.SWEEP)]
         for estimator in sampled_estimator.ESTIMATORS}
    flops = [np.mean(r["tflops_total"]) for r in result["sweep"]["full"].values()]
    assert flops == sorted(flops)  # more sequences a step, more compute for the same steps
    g = result["gradients"]
    estimators = g["estimators"]
    assert set(estimators) == {"on_policy_sampled", *sampled_estimator.VARIANTS} - {"sampled_lora"}
    assert all(len(e["cosine"]) == g["batches"] and all(-1 <= c <= 1 for c in e["cosine"])
               for e in estimators.values())
    assert all(e[side]["noise"] >= 0 for e in estimators.values() for side in ("estimate", "full"))
    assert 0 <= g["excluded_token_share"] <= 1 and np.isfinite([g["mean_k"], g["exact_kl"]]).all()
    table = (out / "sampled_estimator.md").read_text()
    rows = len(result["methods"]) + 1 + (len(estimators) + 1) + 1 + 2 * len(result["sweep"]["full"])
    assert table.count("\n| ") == rows  # each table: a header, then a row each


def test_gradient_signal_and_noise_are_the_unbiased_estimates_over_batches():
    mean = torch.tensor([1.0, 2.0, 0.0])
    noise = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])  # [N, P], summing to 0
    stats = sampled_estimator.signal_noise(mean + noise)
    # mean |g_i|² = 5 + 1; mean over i ≠ j of ⟨g_i, g_j⟩ = 5 + (|Σ noise|² − Σ|noise_i|²) / (4·3) = 5 − 1/3
    assert stats["signal"] == pytest.approx(14 / 3) and stats["noise"] == pytest.approx(4 / 3)
    assert stats["snr"] == pytest.approx(3.5)
    first, rest = (mean + noise) * torch.tensor([1.0, 0, 0]), (mean + noise) * torch.tensor([0, 1.0, 1.0])
    assert sampled_estimator.noise_share(first, mean + noise) == pytest.approx(0.5)
    assert sampled_estimator.noise_share(first, mean + noise) + \
        sampled_estimator.noise_share(rest, mean + noise) == pytest.approx(1.0)


def test_gradient_statistics_read_a_scaled_estimate_as_regression_coefficient_two():
    full = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    stats = sampled_estimator.gradient_statistics(2 * full, full)
    assert stats["regression"] == pytest.approx(2.0) and stats["regression_se"] == pytest.approx(0.0, abs=1e-12)
    assert stats["cosine_summed"] == pytest.approx(1.0)
    assert stats["cosine"] == pytest.approx([1.0] * 3)
    assert stats["estimate"]["noise"] == pytest.approx(4 * stats["full"]["noise"])


def test_self_distill_tracks_kl_to_the_original_from_zero(out):
    result = self_distill.run(out, "tiny", None)
    assert set(result["methods"]) == set(self_distill.METHODS)
    for cs in result["curves"].values():
        assert all(c["kl"][0] == 0.0 and len(c["kl"]) == len(c["accuracy"]) >= 2 for c in cs)
        assert all(kl >= -1e-6 for c in cs for kl in c["kl"])
    assert (out / "results_self_distill.png").stat().st_size > 0


def test_privileged_teacher_compares_opsd_with_plain_self_distillation_whose_gradient_is_zero(out):
    result = privileged_teacher.run(out, "tiny", None)
    assert set(result["methods"]) == set(privileged_teacher.LABELS)
    assert result["methods"]["plain"]["max_grad_norm"] == [0.0]
    assert result["methods"]["privileged"]["max_grad_norm"][0] > 0
    assert (out / "results_privileged_teacher.png").stat().st_size > 0
    assert (out / "privileged_teacher.md").read_text().count("\n| ") == 2


def test_task_rewards_compares_opd_opd_with_the_reward_and_the_reward_alone_on_and_off_the_wrong_subset(out):
    result = task_rewards.run(out, "tiny", None)
    assert set(result["arms"]) == set(task_rewards.ARMS) and set(result["accuracy"]) == {"student", "right", "wrong"}
    for arm, r in result["arms"].items():
        assert all(0 <= x <= 1 for split in task_rewards.SPLITS for x in r[f"{split}_final"])
        rewards = r["train_reward_last_quarter"]  # logged only where the reward is on
        assert (rewards[0] is None) == (r["method"] == "opd") and r["train_seconds"][0] > 0
        curve = result["curves"][arm][0]
        assert curve["steps"] == [0, 1, 2] and len(curve["subset"]) == len(curve["rest"]) == 3
    assert task_rewards.mislabel({"prompt": "10+17=", "answer": "07;02;#27"})["answer"] == "07;02;#28"
    assert task_rewards.mislabel({"prompt": "10+18=", "answer": "08;02;#28"})["answer"] == "08;02;#28"
    assert (out / "results_task_rewards.png").stat().st_size > 0
    assert (out / "task_rewards.md").read_text().count("\n| ") == 3 + len(task_rewards.ARMS)  # start, teachers, arms


def test_moe_routing_tracks_the_moe_students_routing_from_its_start(out):
    result = moe_routing.run(out, "tiny", None)
    assert set(result["moe_runs"]) == {*moe_routing.MOE_METHODS, "sft_flops"}
    assert set(result["dense_runs"]) == {"moe_teacher", "dense_teacher"}
    for role in ("student", "teacher"):
        model = result["models"][role]
        assert model["active_params"] < model["params"]
        assert all(abs(sum(layer) - 1) < 1e-5 for layer in model["load"])
    for runs in result["moe_runs"].values():
        for r in runs:
            assert r["routing"]["steps"][0] == 0 and r["routing"]["steps"][-1] == r["steps"][-1] and r["flops"][-1] > 0
            for tokens in ("answers", "samples"):
                routing = r["routing"][tokens]
                assert routing["topk_changed"][0] == routing["tv"][0] == 0.0
                assert all(0 <= x <= 1 for key in ("topk_changed", "tv", "load_tv") for x in routing[key])
                assert all(abs(sum(layer) - 1) < 1e-5 for layer in routing["load"])
    assert (out / "results_moe_routing.png").stat().st_size > 0
    rows = 1 + len(result["moe_runs"]) + 1 + 2  # the start, each method; the dense table's header, 2 teachers
    sft, matched = (result["moe_runs"][name][0] for name in ("sft", "sft_flops"))
    assert sft["flops"][-1] < result["moe_runs"]["on_policy"][0]["flops"][-1] <= matched["flops"][-1]
    assert (out / "moe_routing.md").read_text().count("\n| ") == rows


def test_routing_change_counts_changed_top_k_sets_total_variation_and_load():
    before = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]])  # [layers, tokens, experts]
    after = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]])
    assert moe_routing.expert_load(before, 2) == [[0.25] * 4]
    assert moe_routing.expert_load(after, 2) == [[0.5, 0.5, 0.0, 0.0]]
    change = moe_routing.routing_change(before, after, 2)
    assert change["topk_changed"] == 0.5  # the second token's top-2 moved from {2, 3} to {0, 1}
    assert abs(change["tv"] - 0.2) < 1e-6 and abs(change["load_tv"] - 0.5) < 1e-6
    assert moe_routing.routing_change(before, before, 2) == {"topk_changed": 0.0, "tv": 0.0, "load_tv": 0.0}
@pytest.mark.slow  # ten tiny trainings: about a minute
def test_published_regime_finds_a_plateau_and_compares_from_it(out):
    result = published_regime.run(out, "tiny", None)
    assert set(result["plateaus"]) == set(result["compared"]) == set(published_regime.GENERATORS)
    assert 0 <= result["data_accuracy"]["carry_blind"] <= 1
    for name, info in result["plateaus"].items():
        assert info["plateau"] == info["accuracy"][info["steps"].index(info["plateau_step"])]
        assert (out / published_regime.NAME / "plateau" / name / "plateau" / "config.json").exists()
    for settings in result["compared"].values():
        assert set(settings) == set(published_regime.SETTINGS)
        for summary in settings.values():
            assert set(summary["methods"]) == set(published_regime.COMPARED)
            assert all(c["flops"][-1] > 0 for cs in summary["curves"].values() for c in cs)
            assert {"ratio_reach", "ratio_stay"} <= set(summary)
    assert (out / "results_published_regime.png").stat().st_size > 0


def test_plateau_is_the_first_eval_near_the_best_with_patience_evals_after_it():
    dip_then_flat = [0.3, 0.17, 0.13, 0.5, 0.6, 0.605, 0.6, 0.608, 0.6]  # the early dip is not the plateau
    assert published_regime.plateau_at(dip_then_flat) == 4
    assert published_regime.plateau_at([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) is None  # still rising
    assert published_regime.plateau_at([0.3, 0.5, 0.6, 0.6, 0.6, 0.6]) is None  # too few evals after it


def test_compute_stays_above_the_target_only_after_the_last_dip():
    c = {"accuracy": [0.5, 0.8, 0.6, 0.8, 0.9], "flops": [0, 1, 2, 3, 4]}
    assert published_regime.stays_from(c, 0.75) == 3
    assert published_regime.stays_from(c, 0.95) is None


def test_carry_blind_answers_drop_only_the_carry_into_the_last_column():
    assert published_regime.carry_blind_answer("964+494=") == "08;15;13;#1358"  # true: 08;15;14;#1458
    assert published_regime.carry_blind_answer("141+365=") == "06;10;04;#406"  # true: 06;10;05;#506
    assert published_regime.carry_blind_answer("123+456=") == "09;07;05;#579"  # no carry into it: right


def test_mode_seeking_reports_probabilities_that_sum_to_one(out):
    result = mode_seeking.run(out, "tiny", None)
    for name, values in result["models"].items():
        assert all(abs(sum(v) - 1) < 1e-4 for v in values), name
    assert set(result["models"]) == {"teacher", "student start", *mode_seeking.METHODS}


def test_forgetting_measures_both_tasks_through_the_stages(out):
    result = forgetting.run(out, "tiny", None)
    assert set(result["scenarios"]) == set(forgetting.SCENARIOS)
    for scenario in result["scenarios"].values():
        assert set(scenario["stage3"]) == set(forgetting.STAGE3)
        assert len(scenario["stage2"]["a"]) == len(scenario["stage2"]["b"]) >= 2
    assert (out / "forgetting" / "results_forgetting.png").stat().st_size > 0


def test_cfg_distill_reports_teacher_and_student_per_scale(out):
    from modalities.image_tokens import toy

    steps = toy.TEACHER_STEPS
    result = cfg_distill.run(out, "tiny", None)
    assert set(result["scales"]) == {f"{s:g}" for s in cfg_distill.SIZES["tiny"]["scales"]}
    assert all(r["pictures_per_s"]["student_after"] > 0 for runs in result["scales"].values() for r in runs)
    assert toy.TEACHER_STEPS == steps  # the tiny build does not leak its settings


def test_sparse_teacher_measures_each_teachers_difference_and_recovery(out):
    result = sparse_teacher.run(out, "tiny", None)
    arms = result["arms"]
    teachers = {*sparse_teacher.NARROW["tiny"], "rl", "broad"}
    assert {r["teacher"] for r in arms.values()} == teachers
    assert len(arms) == len(teachers) * 2 and result["reused"] == {}  # every teacher at two lrs, all run here
    for arm, r in arms.items():
        # the random tiny student is never right, so the reward gives its RL no gradient: the RL teacher is S
        moved = r["teacher"] != "rl"
        assert (r["reverse_kl"] > 0) == (r["forward_kl"] > 0) == moved and 0 <= r["argmax_differs"] <= 1, arm
        assert len(r["kl_steps_0.9"]) == result["seeds"] and len(result["curves"][arm][0]["batch_kl"]) == 4
    narrow = [arms[name]["reverse_kl"] for name in sparse_teacher.NARROW["tiny"]]
    assert narrow == sorted(narrow)  # more SFT steps move the teacher further from the student
    rl = result["rl_teacher"]  # trained by the reward alone: a reward every step, an eval at each
    assert rl["eval_steps"] == [0, 1, 2] and rl["reward_steps"] == [1, 2] and all(0 <= x <= 1 for x in rl["reward_mean"])
    assert set(rl["answers"]) == {"student", "rl", "broad"} and all(a["prompts"] > 0 for a in rl["answers"].values())
    assert (out / "results_sparse_teacher.png").stat().st_size > 0
    rows = len(arms) + 1 + len(rl["answers"])  # the OPD table's rows; a header, what S and the two teachers write
    assert (out / "sparse_teacher.md").read_text().count("\n| ") == rows


def test_kl_closed_is_the_first_step_whose_trailing_mean_falls_far_enough():
    kl = [10.0, 10.0, 8.0, 6.0, 4.0, 1.0, 1.0]  # trailing 2-step means from step 2: 10, 9, 7, 5, 2.5, 1
    assert sparse_teacher.kl_closed(kl, 0.5, 2) == 5 and sparse_teacher.kl_closed(kl, 0.75, 2) == 6
    assert sparse_teacher.kl_closed(kl, 0.95, 2) is None


def test_difference_is_zero_between_a_model_and_itself_and_counts_only_response_positions():
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=32, head_dim=8)
    a, b = transformers.Qwen3ForCausalLM(config).eval(), transformers.Qwen3ForCausalLM(config).eval()

    class Tokenizer:  # prompts are ids already; pad 0
        chat_template, pad_token_id = None, 0

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [int(c) for c in text]}

    prompts, responses = ["12", "345"], [[6, 7, 1], [2]]
    ids, attention, predicts = sparse_teacher.response_batch(Tokenizer(), prompts, responses)
    assert ids.tolist() == [[1, 2, 6, 7, 1], [3, 4, 5, 2, 0]] and attention.sum(-1).tolist() == [5, 4]
    assert predicts.tolist() == [[False, True, True, True], [False, False, True, False]]
    same = sparse_teacher.difference(a, a, Tokenizer(), prompts, responses)
    assert same == {"reverse_kl": 0.0, "forward_kl": 0.0, "argmax_differs": 0.0}
    other = sparse_teacher.difference(a, b, Tokenizer(), prompts, responses)
    assert other["reverse_kl"] > 0 and other["forward_kl"] > 0


def test_gemma_recovery_report_gives_each_method_its_seeds_flops_and_warnings(tmp_path):
    """The real-model experiment's table (its runs take an hour, so only the report runs here): mean ± sd over a
    method's seeds, the training FLOPs of the runs kept in --out (2·N a token forward, 4·N backward, the rollout on
    on-policy steps), and how many runs that recorded their warnings warned ("–" for rows from before they were)."""
    from experiments import gemma_recovery
    from mmopd.config import load_config, save_config

    stage = tmp_path / "opd-s1" / "stage0"
    stage.mkdir(parents=True)
    save_config(load_config(None, {"student.path": "s", "teacher.path": "t", "data.train": "d",
                                   "rollout.max_new_tokens": 24}), stage / "config.yaml")
    steps = [{"step": s, "loss": 1.0, "on_policy": 1.0, "response_tokens": 96.0, "health/token_entropy": 4.0 - s}
             for s in (1, 2)]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    measured = {"reverse_kl": 1.0, "forward_kl": 20.0, "health/token_entropy": 1.5, "health/repeat_share": 0.2,
                "task_accuracy": 0.0, "samples": ["12|34\n5"]}
    rows = [{"method": "opd", "seed": 0, **measured},
            {"method": "opd", "seed": 1, **measured, "reverse_kl": 3.0, "health_warnings": [{"kind": "low_entropy"}]}]
    gemma_recovery.report(tmp_path, rows, None, prompt_tokens=10.0, batch=4)
    row = (tmp_path / "gemma_recovery.md").read_text().splitlines()[2]
    tokens = 4 * 10 + 96  # prompts and responses of a step
    per_step = (2 + 4 + 2) * gemma_recovery.PARAMS["student"] * tokens + 2 * gemma_recovery.PARAMS["teacher"] * tokens
    assert row.startswith("| opd | 2 | 2.000 ± 1.414 | 20.000 ± 0.000 |")
    assert f"| {2 * per_step / 1e15:.3f} (1 run) | 1 of 1 | `12\\|34⏎5` |" in row
    assert (tmp_path / "results_gemma_recovery.png").stat().st_size > 0
