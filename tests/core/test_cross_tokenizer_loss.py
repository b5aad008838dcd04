"""The span estimator for a teacher with another tokenizer: span log-probabilities equal a brute-force forward of
the teacher over the response's characters; with identical tokenizers the cross-tokenizer path is the
same-tokenizer sampled loss, bit for bit; and each span's log-ratio is the advantage of each of its tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers

from mmopd.engines import TOKEN_LOGPROBS, HFRollout, HFTeacher, TeacherNeed, model_scores
from mmopd.engines.cross_tokenizer import CrossTokenizerTeacher
from mmopd.losses import Shaping, masked_mean, span_sums
from mmopd.losses.spans import NONCANONICAL_PENALTY
from mmopd.models.adapter import PolicySide
from mmopd.step.batch import Rollout, Sampling, TokenSpace
from mmopd.step.cross_tokenizer import Aligner
from mmopd.step.scores import Logits, SpanLogprobs, TokenLogprobs
from modalities.text import toy
from modalities.text.adapter import TextAdapter
from tests.cross_tokenizers import pieces

pytestmark = pytest.mark.usefixtures("one_thread")
NEED = TeacherNeed(TOKEN_LOGPROBS)
RECORDS = [{"prompt": "12+34=", "answer": None}, {"prompt": "7+8=", "answer": None}]


def _aligner(student, teacher):
    return Aligner(student, teacher, [student.eos_token_id], teacher.eos_token_id, teacher.pad_token_id)


def test_span_logprobs_equal_a_brute_force_forward_of_the_character_level_teacher():
    """Teacher: the toy's character tokenizer; student: pieces of 1–3 characters (sampled non-canonically too).
    A span's log p_T is the sum, over its characters, of the teacher's log-probs in one unpadded forward over
    prompt + the whole response."""
    teacher_tok = toy.build_tokenizer()
    student_tok = pieces(["12", "123", ";3", "#4", "#45", "=1"], chars=toy.CHARS)
    torch.manual_seed(0)
    teacher = toy.build_model(teacher_tok, "teacher").eval()
    adapter, v = TextAdapter(), student_tok.get_vocab()
    rows = [["123", ";3", "1", "#45", "<eos>"], ["1", "2", "12", ";3", "#4", "#45"]]  # ended; cut (kept 1:1 span)
    width = max(map(len, rows))
    tokens = torch.tensor([[v[t] for t in r] + [student_tok.pad_token_id] * (width - len(r)) for r in rows])
    scorer = CrossTokenizerTeacher(HFTeacher(adapter, teacher, TokenSpace(len(teacher_tok)), fused=False),
                                   _aligner(student_tok, teacher_tok))
    scores = scorer.score(adapter.encode_prompts(RECORDS, teacher_tok), tokens, NEED)
    checked = 0
    for b, (record, row) in enumerate(zip(RECORDS, rows)):
        text = "".join(t for t in row if t != "<eos>")
        chars = teacher_tok(record["prompt"])["input_ids"] + teacher_tok(text, add_special_tokens=False)["input_ids"]
        ids = chars + ([teacher_tok.eos_token_id] if "<eos>" in row else [])
        with torch.no_grad():
            logprobs = teacher(input_ids=torch.tensor([ids])).logits[0, :, :len(teacher_tok)].log_softmax(-1)
        P = len(teacher_tok(record["prompt"])["input_ids"])
        per_char = [logprobs[P - 1 + j, ids[P + j]].item() for j in range(len(ids) - P)]  # the response's
        start = 0
        for i, piece in enumerate(row):
            width = 1 if piece == "<eos>" else len(piece)
            span = scores.span[b, i].item()
            if span >= 0:  # every piece here is its own span: the teacher is character-level
                assert scores.values[b, i].item() == pytest.approx(sum(per_char[start:start + width]), abs=1e-4)
                checked += 1
            start += width
    assert checked == 10 and scores.span[1].tolist()[-1] == -1  # the cut row's "#45" spans 3:1 is dropped


@pytest.fixture(scope="module")
def pair(tiny_text):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_text["student"])
    student = transformers.AutoModelForCausalLM.from_pretrained(tiny_text["student"])
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tiny_text["teacher"]).eval().requires_grad_(False)
    return tok, student, teacher


def _loss(student_scores, teacher_scores, actions, responses, shaping):
    loss, kl = student_scores.sampled_loss(teacher_scores, actions, responses, 1.0, shaping)
    return loss, masked_mean(kl, responses.mask)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shaping", [Shaping(), Shaping(baseline="loo", group=2, clip=5.0)])
def test_with_identical_tokenizers_the_cross_tokenizer_loss_is_the_same_tokenizer_loss_exactly(pair, fused, shaping):
    tok, student, teacher = pair
    adapter, space = TextAdapter(), TokenSpace(len(tok))
    records = toy.make_records(4, seed=5)
    prompts = adapter.encode_prompts(records, tok)
    side = PolicySide(adapter, student, tok, space, [tok.eos_token_id], tok.pad_token_id)
    responses = HFRollout(side, 10).sample(prompts, Sampling(temperature=1.0), torch.Generator().manual_seed(3))
    assert 0 < responses.mask[:, -1].sum() < 4  # some rows cut at max_new_tokens, some ended
    inner = HFTeacher(adapter, teacher, space, fused=fused)
    same = inner.score(prompts, responses.tokens, NEED)
    cross = CrossTokenizerTeacher(inner, _aligner(tok, tok)).score(prompts, responses.tokens, NEED)
    assert isinstance(cross, SpanLogprobs) and cross.one_to_one.float().mul(responses.mask).sum() \
        == responses.mask.sum()
    results = []
    for teacher_scores in (same, cross):
        student.zero_grad()
        scores = model_scores(adapter, student, prompts, responses.tokens, space, fused)
        loss, divergence = _loss(scores, teacher_scores, responses.tokens, responses, shaping)
        loss.backward()
        results.append((loss, divergence, [p.grad.clone() for p in student.parameters()]))
    (loss_a, div_a, grads_a), (loss_b, div_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(div_a, div_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_each_tokens_advantage_is_its_spans_log_ratio_and_the_gradient_its_spans():
    """Spans {0, 1}, {2}, {3, 4 dropped}: on-policy, loss = Σ_i k_span(i)·log p_S(x_i) / n in its gradient,
    k_span = Σ log p_S − log p_T over the span."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, requires_grad=True)  # [B, T, V]
    actions = torch.tensor([[1, 4, 2, 6, 0]])
    span = torch.tensor([[0, 0, 1, -1, -1]])
    teacher_span = torch.tensor([[-3.0, -3.0, -0.5, 0.0, 0.0]])  # log p_T of each token's span
    student = Logits(logits)
    s = logits.log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)  # [1, 5]
    mask = torch.ones(1, 5)
    responses = Rollout(actions, mask, s.detach())
    loss, kl = student.sampled_loss(SpanLogprobs(teacher_span, span, span == 1), actions, responses, 1.0)
    k = (span_sums(s.detach(), span) - teacher_span)[0]  # [5]
    assert torch.allclose(kl[0, :3], torch.stack([k[0] / 2, k[0] / 2, k[2]])) and kl[0, 3:].eq(0).all()
    expected = (k[:3] * s[0, :3]).sum() / 3  # the gradient's form: k_span·∇log p_S on the 3 scored tokens
    (grad,) = torch.autograd.grad(loss, logits)
    (want,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, want, atol=1e-6)
    assert k[0] == pytest.approx((s[0, 0] + s[0, 1]).item() + 3.0, abs=1e-6)
    same = student.sampled_loss(TokenLogprobs(teacher_span), actions, Rollout(actions, mask, s.detach()), 1.0)[0]
    assert not torch.allclose(loss, same)  # a multi-token span is not its tokens' own log-ratios


def _toy_rows(rows):
    """The toy's pair ("13;" is one student token, so "1", "3", ";" spell it non-canonically) aligned on `rows`,
    the teacher's every token at log-prob −0.5: the SpanLogprobs."""
    student_tok, teacher_tok = toy.build_pieces_tokenizer(), toy.build_tokenizer()
    v = student_tok.get_vocab()
    aligned = _aligner(student_tok, teacher_tok).batch(torch.tensor([[v[t] for t in r] for r in rows]))
    return aligned, aligned.span_logprobs(torch.full(aligned.teacher_ids.shape, -0.5))


TOY_ROWS = [["13;", "#", "9", "<eos>", "<pad>", "<pad>"], ["1", "3", ";", "#", "9", "<eos>"]]


def test_a_span_the_students_tokenizer_would_not_make_loses_the_noncanonical_penalty():
    """Each span of the non-canonical row scores the teacher's log-prob less NONCANONICAL_PENALTY; the canonical
    row's spans score it as it is, and so do the canonical "#", "9" and EOS of the other row (no lookahead here)."""
    aligned, scores = _toy_rows(TOY_ROWS)
    assert aligned.canonical.tolist() == [[True] * 4 + [False] * 2, [False] * 3 + [True] * 3]
    against = replace(scores, extendable=None).against(torch.full((2, 6), -1.0))  # [B, T]
    expected = torch.tensor([[-1.5, -0.5, -0.5, -0.5, 0.0, 0.0],  # "13;" against "1" "3" ";": one span
                             [-0.5 - NONCANONICAL_PENALTY] * 3 + [-0.5] * 3])
    assert torch.equal(against, expected)


def test_a_span_ending_in_a_token_a_longer_one_extends_takes_the_next_spans_log_ratio_too():
    """The digits are extendable ("1" begins "13;"): their advantage adds the next span's log-ratio, so "1" before a
    non-canonical "3" pays its penalty; "13;", ";", "#" and EOS are not. The logged estimate stays each span's own."""
    aligned, scores = _toy_rows(TOY_ROWS)
    assert aligned.extendable.tolist() == [[False, False, True, False, False, False], [True, True] + [False] * 2
                                           + [True, False]]
    student = torch.full((2, 6), -1.0)  # [B, T] log p_S of each sampled token
    advantage = scores.against(student) - student  # [B, T] −(k_j + e_j·k_{j+1})
    k_eos, k_off = -1.0 + 0.5, -1.0 + 0.5 + NONCANONICAL_PENALTY  # EOS's span; each non-canonical span's
    expected = torch.tensor([[-(-1.0 + 1.5), -(-0.5), -(-0.5 + k_eos), -k_eos, 1.0, 1.0],
                             [-(k_off + k_off), -(k_off + k_off), -k_off, -(-0.5), -(-0.5 + k_eos), -k_eos]])
    assert torch.equal(advantage[:, :4], expected[:, :4]) and torch.equal(advantage[1], expected[1])
    estimate = scores.estimate(student - scores.against(student), student)  # [B, T]
    assert torch.equal(estimate[1], torch.tensor([k_off] * 3 + [-0.5, -0.5, k_eos]))
