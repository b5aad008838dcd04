"""Checkpoints are atomic, round-trip the student and trainer state, and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from mmopd import evaluate as mmopd_evaluate
from mmopd import train
from mmopd.models.checkpoint import complete_checkpoints, latest_checkpoint, load_trainer_state, save_checkpoint
from mmopd.run.evaluation import evaluate_policy
from mmopd.run.session import Session
from modalities.text import toy


def test_checkpoint_round_trips_model_processor_and_state(tmp_path):
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, "student")
    state = {"step": 3, "optimizer": {"lr": 0.1}, "rng": torch.get_rng_state()}
    path = save_checkpoint(tmp_path, 3, model, tokenizer, state)
    assert path == tmp_path / "checkpoints" / "step-3" and (path / "COMPLETE").is_file()
    loaded = type(model).from_pretrained(path / "model")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    restored = load_trainer_state(path)
    assert restored["step"] == 3 and torch.equal(restored["rng"], state["rng"])
    assert (path / "model" / "tokenizer.json").is_file()


def test_half_written_checkpoints_are_never_chosen_and_keep_last_prunes(tmp_path):
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, "student")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, {"step": step}, keep_last=2)
    (tmp_path / "checkpoints" / ".tmp-step-9-123").mkdir()  # a crash mid-write
    (tmp_path / "checkpoints" / "step-10").mkdir()  # renamed without a marker: never complete
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert latest_checkpoint(tmp_path).name == "step-3"


REWARDED_LORA = {"objective.reward": "exact_match", "objective.reward_weight": 1.0, "rollout.samples_per_prompt": 2,
                 "student.trainable": "lora"}  # a task reward beside the teacher, on a LoRA student


@pytest.mark.parametrize("extra", [{}, REWARDED_LORA], ids=["sft_weight", "reward_and_lora"])
def test_resume_repeats_the_uninterrupted_run_exactly(text_config, tmp_path, extra):
    settings = {"train.steps": 4, "train.save_every": 2, "train.eval_every": 0, "objective.sft_weight": 0.1, **extra}
    full = text_config(**settings, **{"train.out_dir": str(tmp_path / "a")})
    train(full)
    expected = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]

    interrupted = text_config(**settings, **{"train.out_dir": str(tmp_path / "b")})
    train(interrupted)
    # simulate a crash after step 2's checkpoint: the newer checkpoint never finished
    ckpt = tmp_path / "b" / "checkpoints"
    (ckpt / "step-4").rename(ckpt / ".tmp-step-4-999")
    summary = train(interrupted)
    assert summary["steps"] == 4
    got = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train_rows = lambda rows: [r for r in rows if "loss" in r]  # noqa: E731
    assert [r["step"] for r in train_rows(got)] == [1, 2, 3, 4]  # resumed rows replace, never duplicate
    for a, b in zip(train_rows(expected), train_rows(got)):
        assert a["loss"] == b["loss"] and a["divergence"] == b["divergence"], (a["step"], a, b)
        assert a.get("reward/mean") == b.get("reward/mean") and ("reward/mean" in a) == bool(extra)
    assert summary["student_before"] == json.loads((tmp_path / "a" / "summary.json").read_text())["student_before"]


def test_eval_command_scores_a_checkpoint_and_the_teacher(text_config, tmp_path, capsys):
    from mmopd.cli import main
    from mmopd.config import save_config

    config = text_config(**{"train.steps": 1, "train.out_dir": str(tmp_path / "run")})
    train(config)
    save_config(config, tmp_path / "c.yaml")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "c.yaml"), "--checkpoint", str(tmp_path / "run/checkpoints/step-1")]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    assert main(["eval", str(tmp_path / "c.yaml"), "--teacher"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)


def test_a_resume_on_another_eval_set_measures_before_on_that_set(text_config, tmp_path):
    train(text_config(**{"train.steps": 1}))
    # a new eval set on which the starting student scores 1.0: its own greedy responses are the answers
    session = Session(text_config(), for_eval=True)
    records = session.eval_data.records[:4]
    responses = evaluate_policy(session.side(session.policy, session.student_processor), records, 8, 4,
                                session.device)["responses"]
    assert all(r.strip() and "#" not in r for r in responses), responses
    new_eval = tmp_path / "new_eval.jsonl"
    new_eval.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": a}) + "\n"
                                for r, a in zip(records, responses)))
    summary = train(text_config(**{"train.steps": 2, "data.eval": str(new_eval)}))
    assert summary["student_before"] == 1.0
    on_new = text_config(**{"data.eval": str(new_eval)})
    assert summary["teacher"] == mmopd_evaluate(on_new, which="teacher")["accuracy"]
    assert summary["eval_set"] == Session(on_new, for_eval=True).eval_set()
