"""Behaviour of the synthetic addition task: records, answer parsing, tokenizer, tiny models, SFT and greedy eval."""

from __future__ import annotations

import torch

from modalities.text import toy


def tiny_model(tokenizer) -> torch.nn.Module:
    """A very small Qwen3 model built through build_model with a temporary size entry."""
    toy.MODEL_SIZES["tiny"] = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    try:
        torch.manual_seed(0)
        return toy.build_model(tokenizer, "tiny")
    finally:
        del toy.MODEL_SIZES["tiny"]


def test_records_are_deterministic_per_seed_and_differ_across_seeds():
    assert toy.make_records(50, seed=3) == toy.make_records(50, seed=3)
    assert toy.make_records(50, seed=3) != toy.make_records(50, seed=4)


def test_final_answer_of_every_record_is_the_true_sum():
    for digits in (1, 2, 3, 4):
        for r in toy.make_records(200, seed=digits, digits=digits):
            a, b = r["prompt"].rstrip("=").split("+")
            assert len(a) == len(b) == digits
            assert toy.final_answer(r["answer"]) == str(int(a) + int(b))


def test_reasoning_chain_writes_column_sums_least_significant_first():
    assert toy.reasoning(347, 586) == "13;13;09;#933"
    assert toy.reasoning(999, 999) == "18;19;19;#1998"
    assert toy.reasoning(100, 100) == "00;00;02;#200"


def test_three_digit_answers_are_thirteen_or_fourteen_chars():
    lengths = {len(r["answer"]) for r in toy.make_records(500, seed=0)}
    assert lengths == {13, 14}
    assert max(lengths) + 1 <= toy.MAX_NEW_TOKENS


def test_final_answer_reads_digits_after_the_last_marker():
    assert toy.final_answer("13;13;09;#933") == "933"
    assert toy.final_answer("347+586=13;13;09;#933") == "933"
    assert toy.final_answer("#1#933") == "933"
    assert toy.final_answer("13;13;09;#933<eos><pad>") == "933"
    assert toy.final_answer(" #933 ") == "933"


def test_final_answer_is_empty_for_malformed_responses():
    for text in ("", "933", "13;13;09;", "13;13;09;#", "#93;3", "#9a3", "#-933", "#９３３"):
        assert toy.final_answer(text) == "", text


def test_is_correct_requires_exact_final_answer_match():
    answer = "13;13;09;#933"
    assert toy.is_correct("13;13;09;#933", answer)
    assert toy.is_correct("99;99;99;#933", answer)
    assert not toy.is_correct("13;13;09;#932", answer)
    assert not toy.is_correct("13;13;09;#0933", answer)
    assert not toy.is_correct("13;13;09;#9330", answer)
    assert not toy.is_correct("13;13;09;", answer)
    assert not toy.is_correct("", answer)
    assert not toy.is_correct("#", "#")


def test_tokenizer_is_one_token_per_char_and_round_trips_prompt_plus_answer():
    tokenizer = toy.build_tokenizer()
    for r in toy.make_records(20, seed=0):
        text = r["prompt"] + r["answer"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
        prompt_ids = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        assert prompt_ids + answer_ids == ids


def test_tokenizer_has_distinct_pad_and_eos_and_pads_on_the_left():
    tokenizer = toy.build_tokenizer()
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == toy.MAX_LENGTH
    assert tokenizer.chat_template is None
    assert tokenizer.unk_token_id not in tokenizer("0123456789+=;#", add_special_tokens=False)["input_ids"]
    batch = tokenizer(["1+2=", "10+20="], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]
    assert tokenizer.decode([tokenizer.pad_token_id, *batch["input_ids"][1], tokenizer.eos_token_id], skip_special_tokens=True) == "10+20="


def test_tokenizer_survives_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = toy.build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "347+586=13;13;09;#933"
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.padding_side == "left"
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_models_pad_vocab_to_a_multiple_of_eight_and_carry_special_ids():
    tokenizer = toy.build_tokenizer()
    sizes = {}
    for size in ("teacher", "student"):
        model = toy.build_model(tokenizer, size)
        cfg = model.config
        assert type(model).__name__ == "Qwen3ForCausalLM"
        assert cfg.vocab_size % 8 == 0 and len(tokenizer) <= cfg.vocab_size < len(tokenizer) + 8
        assert model.get_input_embeddings().weight.shape[0] == cfg.vocab_size
        assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
        sizes[size] = sum(p.numel() for p in model.parameters())
    assert sizes["student"] < sizes["teacher"] < 1_000_000


def test_build_model_rejects_unknown_size():
    try:
        toy.build_model(toy.build_tokenizer(), "huge")
    except ValueError as err:
        assert "huge" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_sft_labels_cover_exactly_answer_and_eos():
    tokenizer = toy.build_tokenizer()
    records = [{"prompt": "1+2=", "answer": "03;#3"}, {"prompt": "10+20=", "answer": "00;03;#30"}]
    ids, mask, labels = toy.encode_sft(tokenizer, records)
    assert ids.shape == mask.shape == labels.shape == (2, 16)
    assert mask.sum(1).tolist() == [10, 16]
    assert (labels != -100).sum(1).tolist() == [6, 10]
    assert labels[0, 4:10].tolist() == tokenizer("03;#3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[0, 10:].eq(tokenizer.pad_token_id).all()


def test_fit_lowers_the_loss_of_a_tiny_model_within_a_few_steps():
    torch.set_num_threads(1)
    tokenizer = toy.build_tokenizer()
    model = tiny_model(tokenizer)
    losses = toy.fit(model, tokenizer, toy.make_records(256, seed=0), steps=30, lr=1e-2, batch_size=32, seed=0, warmup=5)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert not model.training


def test_fit_is_deterministic_given_the_seed():
    torch.set_num_threads(1)
    tokenizer = toy.build_tokenizer()
    records = toy.make_records(64, seed=0)
    runs = [toy.fit(tiny_model(tokenizer), tokenizer, records, steps=5, lr=1e-2, batch_size=8, seed=7, warmup=2) for _ in range(2)]
    assert runs[0] == runs[1]


def test_greedy_accuracy_is_one_on_a_memorised_single_record():
    torch.set_num_threads(1)
    tokenizer = toy.build_tokenizer()
    model = tiny_model(tokenizer)
    records = toy.make_records(1, seed=0)
    assert toy.greedy_accuracy(model, tokenizer, records, max_new_tokens=toy.MAX_NEW_TOKENS) == 0.0
    toy.fit(model, tokenizer, records, steps=60, lr=1e-2, batch_size=4, seed=0, warmup=5)
    assert toy.greedy_accuracy(model, tokenizer, records, max_new_tokens=toy.MAX_NEW_TOKENS) == 1.0


def test_greedy_accuracy_is_a_fraction_on_mixed_length_prompts_and_keeps_the_mode():
    torch.set_num_threads(1)
    tokenizer = toy.build_tokenizer()
    model = tiny_model(tokenizer).train()
    records = toy.make_records(3, seed=0, digits=1) + toy.make_records(3, seed=0, digits=3)
    accuracy = toy.greedy_accuracy(model, tokenizer, records, max_new_tokens=4, batch_size=4)
    assert 0.0 <= accuracy <= 1.0
    assert model.training
