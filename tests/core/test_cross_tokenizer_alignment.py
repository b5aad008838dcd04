"""Cross-tokenizer alignment as a specification: spans spell the same characters on both sides, whatever the
tokenizers do with bytes, whitespace, normalisation and special tokens; a cut response drops its last span; the
student's EOS is scored as the teacher's."""

from __future__ import annotations

import unicodedata

import pytest
import torch
from tokenizers import processors

from mmopd.step.cross_tokenizer import Aligner, extendable_ids, prefix_cuts, shared_spans, student_cuts
from tests.cross_tokenizers import TEXT, byte_level, char_level, pieces

ADVERSARIAL = {
    "emoji": "ok 🙂👍🏽!",
    "cjk": "中文字 abc",
    "combining": "cafe\u0301 héllo",
    "spaces": "a   b    c ",
    "mixed": "12+3=15; #wörld 🙂 中\n",
}


@pytest.fixture(scope="module")
def toks():
    corpus = [TEXT * 3, "hello world 🙂 中文 abc abc 12 12 " * 5]
    return {"char": char_level(), "pieces": pieces(["ab", "abc", "  ", "   ", "12", "15", "o ", "🙂👍"]),
            "byte_fallback": pieces(["ab", "bc", "  "], byte_fallback=True), "byte_level": byte_level(corpus),
            "nfc": char_level(nfc=True), "eos_other": char_level(specials=["<pad>", "</s>", "<unk>"], eos="</s>")}


def _aligner(student, teacher):
    return Aligner(student, teacher, [student.eos_token_id], teacher.eos_token_id, teacher.pad_token_id)


def _text(tokenizer, ids):
    return unicodedata.normalize("NFC", tokenizer.decode(ids))


@pytest.mark.parametrize("pair", [("byte_level", "char"), ("byte_fallback", "byte_level"), ("pieces", "char"),
                                  ("char", "nfc"), ("byte_fallback", "pieces"), ("char", "byte_level")])
def test_spans_tile_both_responses_and_spell_the_same_text_on_adversarial_strings(toks, pair):
    student, teacher = toks[pair[0]], toks[pair[1]]
    for name, text in ADVERSARIAL.items():
        ids = student(text, add_special_tokens=False)["input_ids"]
        row = _aligner(student, teacher).row(ids + [student.eos_token_id])
        *body, eos = row.spans
        assert eos == (len(ids), len(ids) + 1, len(row.teacher_ids) - 1, len(row.teacher_ids)), name
        assert row.teacher_ids[-1] == teacher.eos_token_id
        s_prev = t_prev = 0
        for a, b, c, d in body:
            assert (a, c) == (s_prev, t_prev) and b > a and d > c, (name, body)
            assert _text(student, ids[a:b]) == _text(teacher, row.teacher_ids[c:d]), (name, a, b, c, d)
            s_prev, t_prev = b, d
        assert (s_prev, t_prev) == (len(ids), len(row.teacher_ids) - 1), name
        assert all(row.canonical), name  # the student's own encoding: every token canonical


def test_a_byte_fallback_character_is_one_span_against_one_character_token(toks):
    student, teacher = toks["byte_fallback"], toks["char"]
    ids = student("a中b", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5  # a, three UTF-8 byte pieces, b
    row = _aligner(student, teacher).row(ids + [student.eos_token_id])
    assert row.spans == [(0, 1, 0, 1), (1, 4, 1, 2), (4, 5, 2, 3), (5, 6, 3, 4)]


def test_byte_level_pieces_of_an_emoji_make_no_cut_inside_it(toks):
    student, teacher = toks["char"], toks["byte_level"]
    t_ids = teacher("🙂", add_special_tokens=False)["input_ids"]
    assert len(t_ids) > 1  # the emoji's bytes across tokens
    row = _aligner(student, teacher).row(student("c🙂", add_special_tokens=False)["input_ids"] + [1])
    assert [(a, b) for a, b, _, _ in row.spans[:-1]][-1] == (1, 2)  # the emoji's one student token, one span


def test_runs_of_spaces_merged_on_one_side_are_one_span(toks):
    student, teacher = toks["char"], toks["pieces"]
    ids = student("a   b", add_special_tokens=False)["input_ids"]
    row = _aligner(student, teacher).row(ids + [student.eos_token_id])
    assert teacher.convert_ids_to_tokens(row.teacher_ids[:-1]) == ["a", "   ", "b"]
    assert row.spans[:-1] == [(0, 1, 0, 1), (1, 4, 1, 2), (4, 5, 2, 3)]


def test_a_combining_mark_the_teacher_normalises_shares_a_span_with_its_base_letter(toks):
    student, teacher = toks["char"], toks["nfc"]
    ids = student("e\u0301o", add_special_tokens=False)["input_ids"]
    row = _aligner(student, teacher).row(ids + [student.eos_token_id])
    assert teacher.convert_ids_to_tokens(row.teacher_ids[:-1]) == ["é", "o"]
    assert row.spans[:-1] == [(0, 2, 0, 1), (2, 3, 1, 2)]


def test_a_non_canonical_student_tokenisation_aligns_by_characters(toks):
    student, teacher = toks["pieces"], toks["char"]
    vocab = student.get_vocab()
    ids = [vocab["ab"], vocab["c"], vocab["1"], vocab["2"]]  # "abc12" as the student sampled it, not "abc", "12"
    row = _aligner(student, teacher).row(ids + [student.eos_token_id])
    assert row.spans == [(0, 1, 0, 2), (1, 2, 2, 3), (2, 3, 3, 4), (3, 4, 4, 5), (4, 5, 5, 6)]
    assert row.canonical == [False] * 4 + [True]  # the student's tokenizer spells "abc12" as "abc", "12"
    mixed = _aligner(student, teacher).row([vocab["abc"], vocab["1"], vocab["2"], student.eos_token_id])
    assert mixed.canonical == [True, False, False, True]


def test_a_response_cut_at_max_new_tokens_drops_its_last_span_unless_it_is_one_to_one(toks):
    """Cut inside what the teacher makes one token ("ab" of "abc"): that span is not scored, the rest is."""
    student, teacher = toks["char"], toks["pieces"]
    ids = student("12ab", add_special_tokens=False)["input_ids"]  # no EOS: cut
    aligner = _aligner(student, teacher)
    row = aligner.row(ids)
    assert teacher.convert_ids_to_tokens(row.teacher_ids) == ["12", "ab"] and row.spans == [(0, 2, 0, 1)]
    batch = aligner.batch(torch.tensor([ids]))
    assert batch.student_span.tolist() == [[0, 0, -1, -1]]
    assert batch.teacher_span[0, :2].tolist() == [0, -1]
    cut_after_12 = aligner.row(ids[:2] + student("c", add_special_tokens=False)["input_ids"])  # "12" + "c"
    assert cut_after_12.spans == [(0, 2, 0, 1), (2, 3, 1, 2)]


def test_the_students_eos_is_scored_as_the_teachers_eos_and_pads_follow(toks):
    student, teacher = toks["char"], toks["eos_other"]
    assert student.eos_token_id != teacher.eos_token_id or student.convert_ids_to_tokens(student.eos_token_id) \
        != teacher.convert_ids_to_tokens(teacher.eos_token_id)
    ids = student("ab", add_special_tokens=False)["input_ids"] + [student.eos_token_id, student.pad_token_id]
    batch = _aligner(student, teacher).batch(torch.tensor([ids]))
    assert teacher.convert_ids_to_tokens(batch.teacher_ids[0, :3].tolist()) == ["a", "b", "</s>"]
    assert batch.teacher_ids[0, 3].item() == teacher.pad_token_id
    assert batch.student_span.tolist() == [[0, 1, 2, -1]] and batch.one_to_one.tolist() == [[True] * 3 + [False]]


def test_a_special_token_inside_a_response_is_the_teachers_special_token_of_that_name(toks):
    student = char_level(specials=["<pad>", "<eos>", "<unk>", "<sep>"])
    teacher = char_level(specials=["<pad>", "<eos>", "<unk>", "<x>", "<sep>"])
    ids = [student.convert_tokens_to_ids(t) for t in ["a", "<sep>", "b", "<eos>"]]
    row = _aligner(student, teacher).row(ids)
    assert teacher.convert_ids_to_tokens(row.teacher_ids) == ["a", "<sep>", "b", "<eos>"]
    assert row.spans == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3), (3, 4, 3, 4)]


def test_tokens_that_decode_to_nothing_join_the_span_before_them():
    assert shared_spans([1, 1, 2], [2], 2) == [(0, 3, 0, 1)]
    assert shared_spans([0, 1, 2], [1, 2], 2) == [(0, 2, 0, 1), (2, 3, 1, 2)]


def test_a_response_with_no_text_is_scored_by_its_eos_alone(toks):
    student, teacher = toks["char"], toks["pieces"]
    row = _aligner(student, teacher).row([student.eos_token_id])
    assert row.teacher_ids == [teacher.eos_token_id] and row.spans == [(0, 1, 0, 1)]
    assert _aligner(student, teacher).row([]).spans == []


def test_span_logprobs_sum_the_teachers_tokens_of_each_span(toks):
    student, teacher = toks["char"], toks["pieces"]
    ids = student("abc 12", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    batch = _aligner(student, teacher).batch(torch.tensor([ids]))
    assert teacher.convert_ids_to_tokens(batch.teacher_ids[0, :4].tolist()) == ["abc", " ", "12", "<eos>"]
    teacher_lp = -torch.arange(1.0, 1.0 + batch.teacher_ids.shape[1])[None]  # [1, Tt]: -1, -2, ...
    scores = batch.span_logprobs(teacher_lp)
    assert scores.values.tolist() == [[-1.0, -1.0, -1.0, -2.0, -3.0, -3.0, -4.0]]
    assert scores.span.tolist() == [[0, 0, 0, 1, 2, 2, 3]]
    assert scores.one_to_one.tolist() == [[False] * 3 + [True] + [False] * 2 + [True]]


def test_whitespace_a_teacher_leaves_out_of_its_offsets_goes_with_the_token_after_it():
    """A byte-level teacher that trims offsets: "Ġabc" covers "abc" only, its space belongs to it nonetheless."""
    teacher = byte_level([TEXT * 3, "ok abc ok  abc " * 5])
    teacher.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    student = char_level()
    enc = teacher("ok  abc", add_special_tokens=False, return_offsets_mapping=True)
    assert enc["offset_mapping"][-1][0] == 4  # "Ġabc" starts after its space
    row = _aligner(student, teacher).row(student("ok  abc", add_special_tokens=False)["input_ids"] + [1])
    assert [_text(teacher, row.teacher_ids[c:d]) for _, _, c, d in row.spans[:-1]][-1] == " abc"
    assert row.spans[-2][:2] == (3, 7)


@pytest.mark.parametrize("name", ["char", "pieces", "byte_fallback", "byte_level", "nfc"])
def test_the_students_cuts_are_the_cuts_of_decoded_prefixes(toks, name):
    """The one-by-one fast path and the reference (every prefix decoded) agree, also on sampled token soup."""
    tokenizer = toks[name]
    soup = torch.randint(3, len(tokenizer), (30,), generator=torch.Generator().manual_seed(0)).tolist()
    for ids in [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ADVERSARIAL.values()] + [soup]:
        text, cuts = student_cuts(tokenizer, ids)
        assert cuts == prefix_cuts(tokenizer, ids, text), tokenizer.convert_ids_to_tokens(ids)


def test_a_token_is_extendable_where_its_text_begins_a_longer_tokens():
    """Pieces "12", "123", ";3", "#4", "#45", "=1" over characters: "1" begins "12", "12" begins "123", "#4" begins
    "#45"; "123", "3" and the special tokens begin none. A character-level tokenizer has none."""
    tok = pieces(["12", "123", ";3", "#4", "#45", "=1"], chars="0123456789+=;#")
    assert sorted(tok.convert_ids_to_tokens(extendable_ids(tok))) == ["#", "#4", "1", "12", ";", "="]
    assert extendable_ids(char_level()) == []
