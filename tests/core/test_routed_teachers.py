"""Several teachers by route: each record's rows are scored by the teacher it names, the per-teacher divergences
are logged, and the configs and records that cannot route are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from mmopd.cli import main
from mmopd.config import ConfigError, config_from_dict, load_config
from mmopd.data.records import DataError
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, HFTeacher, TeacherNeed
from mmopd.engines.routed import RoutedTeacher
from mmopd.losses import masked_mean
from mmopd.models.compat import IncompatibleModelsError
from mmopd.run.objectives import Plan, Timer, model_scores, objective_step
from mmopd.run.session import Session, evaluate
from mmopd.step.batch import Sampling
from modalities.text import toy

pytestmark = pytest.mark.usefixtures("one_thread")


def _reverse(record: dict) -> dict:
    """Another rule on the same prompts and vocabulary: the answer written backwards."""
    return {**record, "answer": record["answer"][::-1]}


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory) -> dict[str, Path]:
    """Two trained teachers that disagree: `add` learns the toy's answers, `reverse` the answers reversed (40 SFT
    steps each from the same random start), and train records routed half to each."""
    out = tmp_path_factory.mktemp("two_teachers")
    paths = toy.build_untrained(out / "base")
    records = toy.make_records(256, seed=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["teacher"])
    for name, rows in (("add", records), ("reverse", [_reverse(r) for r in records])):
        model = transformers.AutoModelForCausalLM.from_pretrained(paths["teacher"])
        toy.fit(model, tokenizer, rows, steps=40, lr=3e-3, batch_size=32, seed=0)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        paths[name] = out / name
    routed = [{**r, "teacher": "add" if i % 2 == 0 else "reverse"} for i, r in enumerate(toy.make_records(32, 1))]
    paths["routed"] = out / "routed.jsonl"
    paths["routed"].write_text("".join(json.dumps(r) + "\n" for r in routed))
    return paths


def _config(paths, tmp_path, teachers=None, **overrides):
    """Two routed teachers (or `teachers`) over the routed records, 8 prompts a step, 8 new tokens."""
    teachers = teachers if teachers is not None else [{"name": "add", "path": str(paths["add"])},
                                                      {"name": "reverse", "path": str(paths["reverse"])}]
    return load_config(None, {"modality": "text", "student.path": str(paths["student"]), "teacher": teachers,
                              "data.train": str(paths["routed"]), "data.eval": str(paths["eval"]),
                              "rollout.max_new_tokens": 8, "train.steps": 3, "train.batch_size": 8,
                              "train.eval_every": 0, "train.save_every": 0, "train.warmup": 0,
                              "train.out_dir": str(tmp_path / "run"), "train.progress": False, **overrides})


def _routed_batch(session, n=8):
    records = [session.train_data.records[i] for i in range(n)]
    prompts = session.adapter.encode_prompts(records, session.teacher_processor)
    prompts.state["records"] = records
    tokens = torch.randint(0, session.space.size, (n, 6), generator=torch.Generator().manual_seed(0))
    return records, prompts, tokens


@pytest.mark.parametrize("need", [TeacherNeed(DISTRIBUTION), TeacherNeed(TOKEN_LOGPROBS),
                                  TeacherNeed(TOP_K, k=4, tail=True)], ids=["distribution", "token_logprobs", "tail"])
def test_each_row_is_scored_by_the_teacher_its_record_names(two_teachers, tmp_path, need):
    session = Session(_config(two_teachers, tmp_path))
    models = session.models()
    assert isinstance(models.scorer, RoutedTeacher) and set(session.teachers) == {"add", "reverse"}
    records, prompts, tokens = _routed_batch(session)
    got = models.scorer.score(prompts, tokens, need)
    names = [r["_teacher"] for r in records]
    assert names == ["add", "reverse"] * 4
    for name in ("add", "reverse"):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        model, processor = session.teachers[name]
        alone = HFTeacher(session.adapter, model, session.space, fused=False).score(
            session.adapter.encode_prompts([records[i] for i in rows], processor), tokens[rows], need)
        other = HFTeacher(session.adapter, session.teachers[{"add": "reverse", "reverse": "add"}[name]][0],
                          session.space, fused=False).score(
            session.adapter.encode_prompts([records[i] for i in rows], processor), tokens[rows], need)
        for field in vars(alone):
            assert torch.equal(getattr(got, field)[rows], getattr(alone, field)), (name, field)
        assert not torch.allclose(other.values, alone.values, atol=1e-3)  # the two teachers do differ here


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_per_teacher_divergences_are_the_divergence_over_each_teachers_rows(two_teachers, tmp_path, estimator):
    session = Session(_config(two_teachers, tmp_path, **{"objective.estimator": estimator}))
    models = session.models()
    records = [session.train_data.records[i] for i in range(8)]
    metrics = objective_step(models, records, Plan.of(session.config), torch.Generator().manual_seed(5), Timer(),
                             lambda loss: None)
    # the same rollout again (the step's first draw from its generator), each teacher's rows scored alone
    s_prompts = session.adapter.encode_prompts(records, session.student_processor)
    responses = models.rollout.sample(s_prompts, Sampling(), torch.Generator().manual_seed(5))
    actions = session.space.to_actions(responses.tokens)
    names = [r["_teacher"] for r in records]
    tokens = {}
    for name in ("add", "reverse"):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        model, processor = session.teachers[name]
        t_prompts = session.adapter.encode_prompts([records[i] for i in rows], processor)
        with torch.no_grad():
            student = model_scores(session.adapter, session.policy, s_prompts, responses.tokens, session.space,
                                   models.fused)
            if estimator == "full":
                teacher = HFTeacher(session.adapter, model, session.space, fused=False).score(
                    t_prompts, responses.tokens[rows], TeacherNeed(DISTRIBUTION))
                expected = masked_mean(toy_divergence(student.values[rows], teacher.values), responses.mask[rows])
            else:
                teacher = HFTeacher(session.adapter, model, session.space, fused=False).score(
                    t_prompts, responses.tokens[rows], TeacherNeed(TOKEN_LOGPROBS))
                log_ratio = student.logprobs(actions)[rows] - teacher.values
                expected = masked_mean(log_ratio, responses.mask[rows])
        assert metrics[f"divergence/{name}"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6), name
        tokens[name] = responses.mask[rows].sum().item()
    overall = sum(metrics[f"divergence/{n}"] * tokens[n] for n in tokens) / sum(tokens.values())
    assert metrics["divergence"] == pytest.approx(overall, rel=1e-4)  # the overall one is their token-weighted mean


def toy_divergence(student_logits, teacher_logits):
    """The reverse KL per position, KL(p_S ‖ p_T), by its formula. [b, T, A] twice -> [b, T]"""
    s, t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    return (s.exp() * (s - t)).sum(-1)


def test_a_record_naming_an_unknown_teacher_is_refused_with_its_place_and_the_names(two_teachers, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+2=", "answer": "x", "teacher": "add"}) + "\n" +
                   json.dumps({"prompt": "1+2=", "answer": "x", "teacher": "maths"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2.*'maths', which is no teacher; the teachers are add, reverse"):
        Session(_config(two_teachers, tmp_path, **{"data.train": str(bad)}))


def test_a_record_without_the_field_is_refused_when_there_are_several_teachers(two_teachers, tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:1.*no 'route' field naming its teacher.*add, reverse"):
        Session(_config(two_teachers, tmp_path, **{"data.train": str(two_teachers["train"]),
                                                   "data.teacher_field": "route"}))


def test_the_route_field_is_configurable_and_a_lone_named_teacher_needs_none(two_teachers, tmp_path):
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"], "who": r["teacher"]}) + "\n"
                             for r in map(json.loads, two_teachers["routed"].read_text().splitlines())))
    session = Session(_config(two_teachers, tmp_path, **{"data.train": str(moved), "data.teacher_field": "who"}))
    assert [session.train_data.records[i]["_teacher"] for i in range(4)] == ["add", "reverse", "add", "reverse"]
    lone = Session(_config(two_teachers, tmp_path, [{"name": "add", "path": str(two_teachers["add"])}],
                           **{"data.train": str(two_teachers["train"])}))
    assert lone.train_data.records[0]["_teacher"] == "add"


def test_teachers_with_different_vocabularies_are_refused(two_teachers, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_teachers["reverse"], other)
    tokenizer = transformers.AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(IncompatibleModelsError, match="teachers 'add' .* and 'reverse' .* different vocabularies"):
        Session(_config(two_teachers, tmp_path, [{"name": "add", "path": str(two_teachers["add"])},
                                                 {"name": "reverse", "path": str(other)}]))


@pytest.mark.parametrize("teachers, message", [
    ([{"name": "a", "path": "x"}, {"name": "a", "path": "y"}], "teacher names must differ; 'a' appears more"),
    ([{"name": "a", "path": "x"}, {"path": "y"}], r"teacher\[1\] has no name"),
    ([{"name": "a b", "path": "x"}], r"teacher\[0\].name='a b' may hold letters"),
    ([{"name": "a", "path": "x", "top_k": 4}, {"name": "b", "path": "y"}], "several teachers must agree on"),
    ([{"name": "a", "path": "x"}, {"name": "b"}], "teacher 'b': path is required"),
    ([{"name": "a", "path": "x", "top_k": 4, "tail": True}, {"name": "b", "path": "y", "top_k": 4}],
     "disagree on the tail class"),
    ([], "teacher is an empty list"),
    ([{"name": "a", "path": "x", "dtype": "f32"}], "teacher 'a': dtype is 'f32'"),
    ([{"name": "a", "path": "x"}, {"name": "b", "path": "y", "tail": True}], "teacher 'b': tail adds a tail class"),
], ids=["duplicate", "unnamed", "bad-name", "top-k", "no-path", "tail", "empty", "dtype", "tail-without-top-k"])
def test_teacher_lists_that_cannot_route_are_refused(teachers, message):
    raw = {"student": {"path": "s"}, "teacher": teachers, "data": {"train": "d.jsonl"}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_several_teachers_refuse_seq_kd_and_a_teachers_key():
    with pytest.raises(ConfigError, match="seq_kd samples its responses from one teacher"):
        config_from_dict({"student": {"path": "s"}, "teacher": [{"name": "a", "path": "x"}],
                          "data": {"train": "d"}, "objective": {"kind": "seq_kd"}})
    with pytest.raises(ConfigError, match="several teachers go under 'teacher' as a list"):
        config_from_dict({"student": {"path": "s"}, "teachers": [{"name": "a", "path": "x"}], "data": {"train": "d"}})


def test_a_teacher_list_round_trips_through_the_saved_config_and_one_mapping_stays_one():
    raw = {"student": {"path": "s"}, "data": {"train": "d"}, "objective": {"estimator": "sampled"},
           "teacher": [{"name": "a", "path": "x"}, {"name": "b", "path": "y", "engine": "vllm",
                                                     "url": "http://127.0.0.1:9"}]}
    config = config_from_dict(raw)
    assert config.teacher.name == "a" and [t.name for t in config.teachers] == ["a", "b"]
    saved = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    assert [t["path"] for t in saved["teacher"]] == ["x", "y"] and "teachers" not in saved
    assert config_from_dict(saved).teachers == config.teachers
    one = config_from_dict({"student": {"path": "s"}, "teacher": {"path": "x"}, "data": {"train": "d"}})
    assert one.teachers == [] and isinstance(one.to_dict()["teacher"], dict)


def test_a_two_teacher_run_trains_end_to_end_through_mmopd_train_and_resumes(two_teachers, tmp_path, capsys):
    out = tmp_path / "run"
    config = {"modality": "text", "student": {"path": str(two_teachers["student"])},
              "teacher": [{"name": "add", "path": str(two_teachers["add"])},
                          {"name": "reverse", "path": str(two_teachers["reverse"])}],
              "data": {"train": str(two_teachers["routed"]), "eval": str(two_teachers["eval"])},
              "objective": {"kind": "on_policy", "estimator": "full"}, "rollout": {"max_new_tokens": 8},
              "train": {"steps": 3, "batch_size": 8, "eval_every": 0, "save_every": 3, "warmup": 0,
                        "out_dir": str(out), "progress": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["train", str(path)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["divergence/add"] > 0 and r["divergence/reverse"] > 0 for r in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["divergence_by_teacher"] == pytest.approx(
        {name: sum(r[f"divergence/{name}"] for r in steps) / 3 for name in ("add", "reverse")})
    assert "teacher" not in summary  # no one teacher answers every eval prompt
    assert "divergence by teacher (mean of the last 10 steps): add " in capsys.readouterr().out
    assert (out / "plots" / "train.png").stat().st_size > 0
    assert main(["train", str(path), "train.steps=5"]) == 0  # the saved config (a teacher list) resumes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]


def test_evaluating_the_teacher_of_several_is_refused(two_teachers, tmp_path):
    with pytest.raises(ConfigError, match="several teachers: evaluate one at a time"):
        evaluate(_config(two_teachers, tmp_path), which="teacher")
