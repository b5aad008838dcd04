"""A privileged teacher: a record's `teacher_prompt` is read by the teacher only. Its scores are hf scoring of
teacher_prompt + response; the student reads `prompt` everywhere; bad teacher prompts are named by record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mmopd.config import load_config
from mmopd.data.records import DataError
from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, HFTeacher, TeacherNeed
from mmopd.run.objectives import Plan, Timer, model_scores, objective_step
from mmopd.run.session import Session
from mmopd.step.scores import Scores, TokenLogprobs
from modalities.text import toy
from tests.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _privileged(n: int = 4, seed: int = 5) -> list[dict]:
    """Toy records whose teacher-only prompt is the answer, then the prompt (all of one length: no padding)."""
    records = [r for r in toy.make_records(64, seed) if len(r["answer"]) == 13][:n]
    return [{**r, "teacher_prompt": r["answer"] + r["prompt"]} for r in records]


def _session(text_config, tmp_path: Path, rows: list[dict], **overrides) -> Session:
    return Session(text_config(**{"data.train": str(write_jsonl(tmp_path / "train.jsonl", rows)), **overrides}))


def _logprobs(scores: Scores, tokens: torch.Tensor) -> torch.Tensor:
    """The sampled tokens' log-probs from a full distribution or from token log-probs. [B, T]"""
    return scores.values if isinstance(scores, TokenLogprobs) else scores.logprobs(tokens)


@pytest.mark.parametrize("need", [TeacherNeed(DISTRIBUTION), TeacherNeed(TOKEN_LOGPROBS)], ids=["full", "sampled"])
def test_privileged_teacher_scores_equal_hf_scoring_of_teacher_prompt_and_response(text_config, tmp_path, need):
    session = _session(text_config, tmp_path, _privileged(), **{"objective.fused": "never"})
    models = session.models()
    records = list(session.train_data.records)
    tokens = torch.randint(3, session.space.size, (len(records), 5), generator=torch.Generator().manual_seed(0))
    logprobs = _logprobs(models.scorer.score(models.teacher_prompts(records), tokens, need), tokens)  # [B, T]
    tok = session.teacher_processor
    ids = torch.tensor([tok(r["teacher_prompt"])["input_ids"] for r in _privileged()])  # [B, P], unpadded
    with torch.no_grad():
        logits = session.teacher(input_ids=torch.cat([ids, tokens], 1)).logits[:, ids.shape[1] - 1:-1]
    expected = logits[..., :session.space.size].log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-6)  # float32 rounding of another batch shape
    plain = _logprobs(models.scorer.score(models.teacher_prompts([{**r, "_teacher_prompt": r["prompt"]}
                                                                  for r in records]), tokens, need), tokens)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the teacher's prompt made the difference


def test_the_student_never_sees_the_teacher_prompt(text_config, tmp_path):
    """One step of self-distillation (teacher = the student's checkpoint): the student's rollout and scores read
    `prompt`; with the plain prompt for the teacher the loss is exactly 0, with the privileged one it is not."""
    rows = _privileged()
    student = str(text_config().student.path)
    losses = {}
    for name, data in (("plain", [{k: v for k, v in r.items() if k != "teacher_prompt"} for r in rows]),
                       ("privileged", rows)):
        session = _session(text_config, tmp_path, data, **{"teacher.path": student})
        models = session.models()
        records = list(session.train_data.records)
        assert [r["prompt"] for r in records] == [r["prompt"] for r in rows]
        metrics = objective_step(models, records, Plan.of(session.config), torch.Generator().manual_seed(0),
                                 Timer(), lambda loss: None)
        losses[name] = metrics["divergence"]
    assert losses["plain"] == 0.0 and losses["privileged"] > 1e-3, losses


def test_a_teacher_sampling_row_samples_after_the_teacher_prompt(text_config, tmp_path):
    """seq_kd: the teacher writes its response after its own prompt; the student learns it after `prompt`."""
    session = _session(text_config, tmp_path, _privileged(), **{"objective.kind": "seq_kd"})
    models = session.models()
    records = list(session.train_data.records)
    prompts = models.teacher_prompts(records)
    tok = session.teacher_processor
    assert tok.batch_decode(prompts.input_ids) == [r["teacher_prompt"] for r in _privileged()]


@pytest.mark.parametrize("value, says", [(3, "must be a non-empty string, got int"),
                                         (" ", "must be a non-empty string, got an empty string")])
def test_a_bad_teacher_prompt_is_refused_naming_the_record(text_config, tmp_path, value, says):
    rows = _privileged()
    rows[2]["teacher_prompt"] = value
    with pytest.raises(DataError, match=rf"train.jsonl:3: bad record: 'teacher_prompt' .*{says}"):
        _session(text_config, tmp_path, rows)


def test_records_without_a_teacher_prompt_give_the_teacher_their_prompt_and_are_counted(text_config, tmp_path,
                                                                                       caplog):
    rows = _privileged()
    del rows[1]["teacher_prompt"]
    with caplog.at_level(logging.INFO, logger="mmopd"):
        session = _session(text_config, tmp_path, rows)
    assert "3 of 4 records carry a teacher-only prompt ('teacher_prompt')" in caplog.text
    prompts = session.models().teacher_prompts(list(session.train_data.records))
    decoded = session.teacher_processor.batch_decode(prompts.input_ids, skip_special_tokens=True)
    assert decoded[1] == rows[1]["prompt"] and decoded[0] == rows[0]["teacher_prompt"]


def test_a_configured_field_is_read_and_one_no_record_carries_is_refused(text_config, tmp_path):
    rows = [{**r, "hint": r.pop("teacher_prompt")} for r in _privileged()]
    session = _session(text_config, tmp_path, rows, **{"data.teacher_prompt_field": "hint"})
    prompts = session.models().teacher_prompts(list(session.train_data.records))
    assert session.teacher_processor.batch_decode(prompts.input_ids) == [r["hint"] for r in rows]
    with pytest.raises(DataError, match="data.teacher_prompt_field='hnt', but no record of .* carries 'hnt'"):
        _session(text_config, tmp_path, rows, **{"data.teacher_prompt_field": "hnt"})


def test_a_teacher_prompt_too_long_for_the_context_is_refused_naming_the_record(text_config, tmp_path):
    rows = _privileged()
    rows[1]["teacher_prompt"] = "1" * 60
    with pytest.raises(DataError, match=r"train.jsonl:2: the teacher's prompt is 60 tokens"):
        _session(text_config, tmp_path, rows)


def test_routed_teachers_each_score_their_rows_after_the_teacher_prompt(tiny_text, tmp_path):
    """Several teachers by route: each encodes its own rows from the teacher's view of the records."""
    rows = [{**r, "teacher": name} for r, name in zip(_privileged(), ["wide", "narrow", "wide", "narrow"])]
    config = load_config(None, {
        "modality": "text", "student.path": str(tiny_text["student"]),
        "teacher": [{"name": "wide", "path": str(tiny_text["teacher"])},
                    {"name": "narrow", "path": str(tiny_text["student"])}],
        "data.train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "objective.fused": "never",
        "rollout.max_new_tokens": 8, "train.out_dir": str(tmp_path / "run")})
    session = Session(config)
    models = session.models()
    records = list(session.train_data.records)
    tokens = torch.randint(3, session.space.size, (4, 5), generator=torch.Generator().manual_seed(1))
    need = TeacherNeed(TOKEN_LOGPROBS)
    routed = models.scorer.score(models.teacher_prompts(records), tokens, need).values  # [B, T]
    for b, row in enumerate(rows):
        model, processor = session.teachers[row["teacher"]]
        prompts = session.adapter.encode_prompts([{"prompt": row["teacher_prompt"]}], processor)
        alone = HFTeacher(session.adapter, model, session.space, fused=False).score(prompts, tokens[b:b + 1], need)
        torch.testing.assert_close(routed[b], alone.values[0], rtol=0, atol=1e-6)



def test_eval_kl_is_to_the_teacher_reading_its_own_prompt(text_config, tmp_path):
    """The eval KL is to the teacher as training scores with it: self-distillation's KL is 0 on plain records, and
    positive where the teacher reads its privileged prompt."""
    rows = _privileged()
    student = str(text_config().student.path)
    kls = {}
    for name, data in (("plain", [{k: v for k, v in r.items() if k != "teacher_prompt"} for r in rows]),
                       ("privileged", rows)):
        path = str(write_jsonl(tmp_path / f"{name}.jsonl", data))
        session = Session(text_config(**{"teacher.path": student, "data.train": path, "data.eval": path}))
        kls[name] = session.eval_kl(session.policy)
        assert session.eval_privileged == (4 if name == "privileged" else 0)
    assert kls["plain"] == {"reverse_kl": 0.0, "forward_kl": 0.0}
    assert kls["privileged"]["reverse_kl"] > 1e-3 and kls["privileged"]["forward_kl"] > 1e-3, kls
