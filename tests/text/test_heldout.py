"""The real-model tools: stdlib docstring prompts, the few-shot task, and the held-out KLs (exact, both ways)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from modalities.text.heldout import greedy_responses, heldout_kls, kl_per_token, measure, sample, teacher_records
from modalities.text.fewshot import CAPITALS, first_word, task_accuracy, task_records
from modalities.text.stdlib_prompts import HELD_OUT_MODULES, TRAIN_MODULES, docstring_prompts


def test_docstring_prompts_are_distinct_short_and_split_by_module():
    train, held_out = docstring_prompts(TRAIN_MODULES), docstring_prompts(HELD_OUT_MODULES)
    assert len(train) > 200 and len(held_out) > 40
    assert not set(train) & set(held_out)
    assert len(set(train)) == len(train)
    assert all(8 <= len(p.split()) <= 10 for p in train + held_out)
    assert docstring_prompts(("json",)) == docstring_prompts(("json",))
    assert all(len(p.split()) <= 4 for p in docstring_prompts(("json",), words=4, min_words=4))


def test_docstring_prompts_name_a_module_that_does_not_import():
    with pytest.raises(ValueError, match="'no_such_module' does not import"):
        docstring_prompts(("json", "no_such_module"))


def test_task_splits_share_no_pair_and_no_country():
    train, held_out = task_records("train"), task_records("eval")
    last_line = lambda r: r["prompt"].rsplit("\n", 1)[-1]  # noqa: E731
    assert not {last_line(r) for r in train} & {last_line(r) for r in held_out}
    assert {r["task"] for r in held_out} == {"addition", "capitals"}
    assert len(held_out) == 81 // 3 + len(CAPITALS) // 3
    for record in held_out:
        shots, question = record["prompt"].rsplit("\n", 1)
        assert question not in shots and record["prompt"].count("\n") == 3
    addition = next(r for r in held_out if r["task"] == "addition")
    a, b = addition["prompt"].rsplit("\n", 1)[-1].rstrip(" =").split(" + ")
    assert addition["answer"] == str(int(a) + int(b))


def test_task_accuracy_reads_the_first_word_only():
    records = [{"answer": "14"}, {"answer": "Paris"}, {"answer": "Bogotá"}]
    assert first_word(" 14\n5 + 3 = 8") == "14" and first_word("  ...") == ""
    assert task_accuracy(records, [" 14\n2 + 2", " Paris.\nThe", " Bogotá"]) == 1.0
    assert task_accuracy(records, [" 141", " the capital", " Bogotá"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one response per record"):
        task_accuracy(records, [" 14"])


@pytest.fixture(scope="module")
def pair(tiny_text):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_text["teacher"])
    load = transformers.AutoModelForCausalLM.from_pretrained
    return tokenizer, load(tiny_text["student"]).eval(), load(tiny_text["teacher"]).eval()


def brute_force_kl(p_model, q_model, tokenizer, prompt: str, response: list[int]) -> tuple[float, int]:
    ids = tokenizer(prompt)["input_ids"]
    total = 0.0
    for t in range(len(response)):
        context = torch.tensor([ids + response[:t]])
        log_p = F.log_softmax(p_model(input_ids=context).logits[0, -1].double(), -1)
        log_q = F.log_softmax(q_model(input_ids=context).logits[0, -1].double(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
    return total, len(response)


@torch.no_grad()
def test_kl_per_token_matches_a_position_by_position_brute_force(pair):
    tokenizer, student, teacher = pair
    prompts = ["12+34=", "5+6="]
    responses = sample(teacher, tokenizer, prompts, max_new_tokens=5, seed=0)
    assert all(1 <= len(r) <= 5 for r in responses)
    sums = [brute_force_kl(teacher, student, tokenizer, p, r) for p, r in zip(prompts, responses)]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert kl_per_token(teacher, student, tokenizer, prompts, responses) == pytest.approx(expected, rel=1e-4)
    assert kl_per_token(student, student, tokenizer, prompts, responses) == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def test_heldout_kls_score_the_student_on_its_own_samples_and_the_teacher_on_the_teachers(pair):
    tokenizer, student, teacher = pair
    prompts = ["12+34=", "5+6=", "7+80="]
    teacher_samples = sample(teacher, tokenizer, prompts, max_new_tokens=4, seed=1)
    out = heldout_kls(student, teacher, tokenizer, prompts, teacher_samples, max_new_tokens=4, seed=2)
    assert out["student_samples"] == sample(student, tokenizer, prompts, max_new_tokens=4, seed=2)
    assert out["reverse_kl"] == pytest.approx(kl_per_token(student, teacher, tokenizer, prompts,
                                                           out["student_samples"]))
    assert out["forward_kl"] == pytest.approx(kl_per_token(teacher, student, tokenizer, prompts, teacher_samples))
    assert out["reverse_kl"] > 0 and out["forward_kl"] > 0
    with pytest.raises(ValueError, match="every response is empty"):
        kl_per_token(student, teacher, tokenizer, prompts, [[], [], []])


@torch.no_grad()
def test_measure_reports_both_kls_the_samples_health_and_the_task_accuracy(pair):
    tokenizer, student, teacher = pair
    prompts = ["12+34=", "5+6="]
    teacher_samples = sample(teacher, tokenizer, prompts, max_new_tokens=4, seed=1)
    greedy = greedy_responses(student, tokenizer, ["1+2=", "3+4="])
    task = [{"prompt": "1+2=", "answer": first_word(greedy[0]) or "x"}, {"prompt": "3+4=", "answer": "never"}]
    out = measure(student, teacher, tokenizer, prompts, teacher_samples, task, max_new_tokens=4)
    kls = heldout_kls(student, teacher, tokenizer, prompts, teacher_samples, max_new_tokens=4)
    assert out["reverse_kl"] == pytest.approx(kls["reverse_kl"]) and out["forward_kl"] == kls["forward_kl"]
    assert out["task_accuracy"] == (0.5 if first_word(greedy[0]) else 0.0)
    assert out["samples"] == [tokenizer.decode(s, skip_special_tokens=True) for s in kls["student_samples"]]
    assert {"health/token_entropy", "health/repeat_share", "health/length_ratio"} <= set(out)
    assert 0 < out["health/length_ratio"] <= 1


@torch.no_grad()
def test_teacher_records_answer_each_prompt_with_a_teacher_sample(pair):
    tokenizer, _, teacher = pair
    records = teacher_records(teacher, tokenizer, ["12+34=", "5+6="], max_new_tokens=4, seed=3)
    samples = sample(teacher, tokenizer, ["12+34=", "5+6="], max_new_tokens=4, seed=3)
    assert records == [{"prompt": p, "answer": tokenizer.decode(s, skip_special_tokens=True)}
                       for p, s in zip(["12+34=", "5+6="], samples)]
