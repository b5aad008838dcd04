"""A teacher with another tokenizer, at start and in a run: detected without a flag, trained with the sampled span
estimator (the share of tokens in one-to-one spans logged), and refused in one line where it cannot work yet."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import normalizers

from mmopd.config import ConfigError
from mmopd.models.compat import IncompatibleModelsError, check_cross_tokenizer, vocabulary_overlap
from mmopd.run.session import Session
from mmopd.run.trainer import train
from modalities.text import toy
from tests.cross_tokenizers import char_level, pieces

pytestmark = pytest.mark.usefixtures("one_thread")
PIECES = ["12", "123", ";0", ";1", "#1", "=1", "+1", "10", "11"]


@pytest.fixture(scope="module")
def pieces_student(tmp_path_factory):
    """The toy's student architecture over pieces of 1–3 of the toy's characters (another tokenizer and size)."""
    tokenizer = pieces(PIECES, chars=toy.CHARS)
    torch.manual_seed(0)
    model = toy.build_model(tokenizer, "student")
    out = tmp_path_factory.mktemp("pieces_student")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_teacher_with_another_tokenizer_trains_with_span_log_ratios_and_logs_the_one_to_one_share(
        text_config, pieces_student, tmp_path, caplog):
    config = text_config(**{"student.path": str(pieces_student), "objective.estimator": "sampled",
                            "rollout.max_new_tokens": 6})
    with caplog.at_level("INFO", logger="mmopd"):
        train(config)
    assert "responses are aligned by character spans" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "cross_tokenizer/one_to_one_share" in r]
    assert len(steps) == 2
    for r in steps:
        assert 0 < r["cross_tokenizer/one_to_one_share"] <= r["cross_tokenizer/scored_share"] <= 1
        assert 0 < r["cross_tokenizer/canonical_share"] <= 1
        assert r["loss"] == r["loss"] and r["divergence"] == r["divergence"]  # finite, not NaN


def test_the_same_tokenizer_is_not_a_cross_tokenizer_pair(text_config):
    session = Session(text_config(**{"objective.estimator": "sampled"}))
    assert not session.cross_tokenizer and type(session.models().scorer).__name__ == "HFTeacher"


@pytest.mark.parametrize("overrides, message", [
    ({}, "objective.kind=on_policy with estimator=full needs the teacher's distribution over the student's tokens"),
    ({"objective.kind": "seq_kd"}, "objective.kind=seq_kd trains on the teacher's own tokens"),
    ({"objective.kind": "gkd"}, "objective.kind=gkd with estimator=full needs the teacher's distribution"),
])
def test_what_a_cross_tokenizer_pair_cannot_do_yet_is_refused_in_one_line(text_config, pieces_student, overrides,
                                                                           message):
    with pytest.raises(ConfigError, match="^" + message) as err:
        Session(text_config(**{"student.path": str(pieces_student), **overrides}))
    assert "\n" not in str(err.value) and "tokenizer differs from the student's" in str(err.value)


def test_a_teacher_that_normalises_text_another_way_is_refused_with_the_reason(text_config, tiny_text, tmp_path):
    """A lower-casing teacher would score other text than the student wrote."""
    student = char_level("ABCabc 123")
    teacher = char_level("ABCabc 123")
    teacher.backend_tokenizer.normalizer = normalizers.Lowercase()
    overlap = vocabulary_overlap(student, teacher)
    assert overlap.reproduced == pytest.approx(7 / 10) and overlap.shared == 1.0
    lowering = char_level("ABCDEFGHIJabc 123")
    lowering.backend_tokenizer.normalizer = normalizers.Lowercase()
    upper = char_level("ABCDEFGHIJ")
    assert vocabulary_overlap(upper, lowering).reproduced == 0.0
    model = toy.build_model(lowering, "teacher")
    model.save_pretrained(tmp_path / "teacher")
    lowering.save_pretrained(tmp_path / "teacher")
    model = toy.build_model(upper, "student")
    model.save_pretrained(tmp_path / "student")
    upper.save_pretrained(tmp_path / "student")
    with pytest.raises(IncompatibleModelsError, match="gives back only 0% of the student's token texts unchanged"):
        Session(text_config(**{"student.path": str(tmp_path / "student"), "teacher.path": str(tmp_path / "teacher"),
                               "objective.estimator": "sampled"}))


def test_a_tokenizer_without_character_offsets_is_refused_with_the_role_and_the_fix():
    class Slow:
        is_fast = False

    with pytest.raises(IncompatibleModelsError, match="the teacher's is a slow tokenizer .Slow. without character "
                       "offsets.*give the teacher a tokenizer.json"):
        check_cross_tokenizer(char_level(), Slow())
    with pytest.raises(IncompatibleModelsError, match="the student's is a slow tokenizer"):
        check_cross_tokenizer(Slow(), char_level())
