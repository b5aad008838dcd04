"""Bad configs, records and model pairs stop the CLI before step 1 with one clear message."""

from __future__ import annotations

import json

import pytest
import yaml
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from mmopd.cli import main
from mmopd.models.compat import IncompatibleModelsError, check_embedding_rows, check_same_vocab
from modalities.text import toy
from tests.conftest import write_jsonl


@pytest.fixture
def run_cli(tiny_text, tmp_path, capsys):
    """Write a config over the tiny task (with `changes`), run `mmopd train`, return (code, stderr)."""

    def run(changes: dict | None = None, args: list[str] | None = None) -> tuple[int, str]:
        config = {"modality": "text",
                  "student": {"path": str(tiny_text["student"])}, "teacher": {"path": str(tiny_text["teacher"])},
                  "data": {"train": str(tiny_text["train"])},
                  "rollout": {"max_new_tokens": 4},
                  "train": {"steps": 1, "batch_size": 2, "out_dir": str(tmp_path / "run"), "progress": False}}
        for key, value in (changes or {}).items():
            section, field = key.split(".")
            config.setdefault(section, {})[field] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        code = main(["train", str(path), *(args or [])])
        return code, capsys.readouterr().err

    return run


def test_a_good_config_trains_and_exits_zero(run_cli, tmp_path):
    code, err = run_cli()
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "COMPLETE").is_file()


def test_malformed_jsonl_reports_the_file_and_line(run_cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2="}\n{"prompt": "3+4=",\n{"prompt": "5+6="}\n')
    code, err = run_cli({"data.train": str(bad)})
    assert code == 2
    assert f"{bad}:2: not valid JSON" in err


def test_records_missing_fields_and_empty_prompts_name_their_line(run_cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2="}, {"question": "?"}])
    code, err = run_cli({"data.train": str(path)})
    assert code == 2 and f"{path}:2: bad record: missing 'prompt'" in err
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "  "}])
    code, err = run_cli({"data.train": str(path)})
    assert code == 2 and "'prompt' is empty" in err


def test_skip_bad_counts_skipped_records_and_trains(run_cli, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "1+2="}\nnot json\n{"prompt": 5}\n{"prompt": "3+4="}\n')
    code, err = run_cli({"data.train": str(path), "data.skip_bad": True})
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_records"] == 2


def test_empty_dataset_is_an_error(run_cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    code, err = run_cli({"data.train": str(empty)})
    assert code == 2 and "holds no usable records" in err
    code, err = run_cli({"data.train": str(tmp_path / "missing.jsonl")})
    assert code == 2 and "data.train: file not found" in err


def test_nonexistent_model_path_is_named(run_cli, tmp_path):
    code, err = run_cli({"student.path": str(tmp_path / "no-such-model")})
    assert code == 2 and "student.path=" in err and "no-such-model" in err and "cannot load" in err


def test_unknown_key_and_bad_override_exit_with_a_message(run_cli):
    code, err = run_cli({"train.stepz": 3})
    assert code == 2 and "did you mean 'train.steps'" in err
    code, err = run_cli(args=["train.steps=-1"])
    assert code == 2 and "train.steps must be > 0" in err


def test_answers_required_by_the_objective_are_checked_up_front(run_cli, tmp_path):
    path = write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "1+2="}])
    code, err = run_cli({"data.train": str(path), "objective.kind": "sft"})
    assert code == 2 and f"{path}:1: objective sft needs an 'answer'" in err


def _wordlevel(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def test_tokenizer_mismatch_shows_the_differing_tokens():
    a = _wordlevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "x": 3, "y": 4})
    b = _wordlevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "y": 3, "x": 4})
    with pytest.raises(IncompatibleModelsError, match=r"'x': student id 3, teacher id 4"):
        check_same_vocab(a, b)
    check_same_vocab(a, _wordlevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "x": 3, "y": 4}))


def test_a_teacher_with_another_tokenizer_stops_the_full_estimator_in_one_line(run_cli, tiny_text, tmp_path):
    """Another tokenizer is aligned by character spans, for the sampled estimator only (for now)."""
    other = tmp_path / "other-teacher"
    model = toy.build_model(toy.build_tokenizer(), "teacher")
    model.save_pretrained(other)
    vocab = toy.build_tokenizer().get_vocab()
    swapped = dict(vocab)
    swapped["1"], swapped["2"] = vocab["2"], vocab["1"]
    _wordlevel(swapped).save_pretrained(other)
    code, err = run_cli({"teacher.path": str(other)})
    assert code == 2 and "the teacher's tokenizer differs from the student's" in err
    assert "use objective.kind=on_policy with objective.estimator=sampled" in err


def test_padded_embedding_rows_are_allowed_but_too_few_rows_are_not():
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, "student")
    assert model.get_output_embeddings().weight.shape[0] > len(tokenizer)  # padded like real models
    check_embedding_rows(model, "student", len(tokenizer))
    with pytest.raises(IncompatibleModelsError, match="LM head has"):
        check_embedding_rows(model, "student", model.get_output_embeddings().weight.shape[0] + 1)


def test_prompt_longer_than_the_context_names_its_line_or_is_skipped(run_cli, tmp_path):
    long_prompt = "1" * 70 + "+2="  # the tiny models' context is 64 tokens
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+2="}, {"prompt": long_prompt}])
    code, err = run_cli({"data.train": str(path)})
    assert code == 2 and f"{path}:2: the prompt is" in err and "exceeds the models' context of 64" in err
    code, err = run_cli({"data.train": str(path), "data.skip_bad": True})
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_records"] == 1


def test_cfg_on_a_text_teacher_is_refused(run_cli):
    code, err = run_cli({"teacher.cfg_scale": 3.0})
    assert code == 2 and "no unconditional branch" in err


def test_chat_template_on_only_one_side_is_refused(run_cli, tmp_path):
    templated = tmp_path / "templated-teacher"
    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    toy.build_model(tokenizer, "teacher").save_pretrained(templated)
    tokenizer.save_pretrained(templated)
    code, err = run_cli({"teacher.path": str(templated)})
    assert code == 2 and "only the teacher tokenizer has a chat template" in err
