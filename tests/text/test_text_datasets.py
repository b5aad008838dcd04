"""Text records from every source `datasets` reads (parquet, CSV, JSON, save_to_disk folders) give the same
records in the same step order as the JSONL, columns map through data.fields, TRL's conversations render
through the chat template, and bad input is a one-line error naming the row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

import mmopd
from mmopd.data.records import WRITER_BATCH_ROWS, DataError, _converted, load_records
from mmopd.data.step_order import step_indices
from mmopd.models.adapter import get_adapter
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from modalities.text.adapter import prompt_text

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _rows(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in rows[0]}


def _forms(jsonl: Path, root: Path) -> dict[str, Path]:
    """The JSONL's records as a parquet, a CSV and a JSON-array file, and a save_to_disk folder."""
    table = datasets.Dataset.from_dict(_columns(_rows(jsonl)))
    root.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(root / "train.parquet"))
    table.to_csv(str(root / "train.csv"), index=False)
    (root / "train.json").write_text(json.dumps(_rows(jsonl)))
    table.save_to_disk(str(root / "disk"))
    return {"parquet": root / "train.parquet", "csv": root / "train.csv", "json": root / "train.json",
            "save_to_disk": root / "disk"}


def _step_records(source: Path, **kwargs) -> list[tuple[str, str]]:
    data = load_records(source, get_adapter("text").check_record, role="data.train", **kwargs)
    return [(data.records[i]["prompt"], data.records[i]["answer"])
            for step in range(3) for i in step_indices(len(data), step, 4, seed=7)]


@pytest.mark.parametrize("form", ["parquet", "csv", "json", "save_to_disk"])
def test_every_form_gives_the_jsonls_records_in_step_order(form, tiny_text, tmp_path):
    source = _forms(tiny_text["train"], tmp_path)[form]
    assert _step_records(source) == _step_records(tiny_text["train"])


def test_a_save_to_disk_folder_trains_with_the_jsonls_first_step_loss(text_config, tiny_text, tmp_path):
    folder = _forms(tiny_text["train"], tmp_path)["save_to_disk"]
    losses = []
    for source in (tiny_text["train"], folder):
        config = text_config(**{"data.train": str(source)})
        session = Session(config)
        batch = [session.train_data.records[i] for i in step_indices(len(session.train_data), 0, 4, 0)]
        row = objective_step(session.models(), batch, Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                             lambda loss: None)
        losses.append(row["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert mmopd.train(text_config(**{"data.train": str(folder)}))["steps"] == 2


def test_data_fields_map_other_column_names_onto_the_record(tiny_text, tmp_path):
    rows = [{"question": r["prompt"], "solution": r["answer"], "id": i} for i, r in enumerate(_rows(tiny_text["train"]))]
    datasets.Dataset.from_dict(_columns(rows)).to_parquet(str(tmp_path / "renamed.parquet"))
    mapped = _step_records(tmp_path / "renamed.parquet", fields={"prompt": "question", "answer": "solution"})
    assert mapped == _step_records(tiny_text["train"])


def test_a_missing_column_is_named_with_the_columns_the_set_has(tiny_text, tmp_path):
    datasets.Dataset.from_dict({"question": ["1+1="], "solution": ["2"]}).to_parquet(str(tmp_path / "s.parquet"))
    with pytest.raises(DataError, match=r"no column 'problem' \(data.fields.prompt\); its columns are: question, "
                                        r"solution"):
        load_records(tmp_path / "s.parquet", get_adapter("text").check_record, fields={"prompt": "problem"})


def test_an_empty_split_is_an_error(tmp_path):
    table = datasets.Dataset.from_dict({"prompt": ["1+1="], "answer": ["2"]}).filter(lambda row: False)
    table.to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match=r"data.train: .*empty\.parquet holds no usable records"):
        load_records(tmp_path / "empty.parquet", get_adapter("text").check_record, role="data.train")


def test_a_missing_split_lists_the_splits(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["q"]})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are train \(set data.eval_split\)"):
        load_records(tmp_path / "d", get_adapter("text").check_record, role="data.eval", split="validation")


def test_a_bad_row_names_the_row_or_is_skipped_and_counted(tmp_path):
    datasets.Dataset.from_dict({"prompt": ["1+1=", "   ", "2+2="], "answer": ["2", "x", "4"]}).to_parquet(
        str(tmp_path / "bad.parquet"))
    check = get_adapter("text").check_record
    with pytest.raises(DataError, match=r"bad\.parquet row 1: bad record: 'prompt' is empty \(set data.skip_bad"):
        load_records(tmp_path / "bad.parquet", check)
    data = load_records(tmp_path / "bad.parquet", check, skip_bad=True)
    assert data.skipped == 1 and [r["prompt"] for r in data.records] == ["1+1=", "2+2="]


def test_skipped_rows_are_the_only_rows_indexed_and_later_drops_keep_the_rest_in_order(tmp_path):
    prompts = ["0=", " ", "2=", " ", " ", "5=", "6=", "7="]
    datasets.Dataset.from_dict({"prompt": prompts, "answer": ["a"] * 8}).to_parquet(str(tmp_path / "s.parquet"))
    data = load_records(tmp_path / "s.parquet", get_adapter("text").check_record, skip_bad=True)
    assert data.records.skipped.tolist() == [1, 3, 4]  # the index holds the 3 bad rows, not the 5 good ones
    assert [r["prompt"] for r in data.records] == ["0=", "2=", "5=", "6=", "7="]
    assert data.records[-1]["_where"].endswith("row 7") and data.records[1]["_where"].endswith("row 2")
    data.drop([0, 3])
    assert data.skipped == 5 and [r["prompt"] for r in data.records] == ["2=", "5=", "7="]
    with pytest.raises(IndexError):
        data.records[3]


def test_a_converted_set_is_cached_in_large_record_batches_so_its_open_table_holds_few(tmp_path):
    rows = 2500  # datasets' default would cache 3 batches of at most 1,000 rows; each costs metadata while open
    datasets.Dataset.from_dict({"prompt": [f"{i}=" for i in range(rows)], "answer": ["a"] * rows}).to_parquet(
        str(tmp_path / "s.parquet"))
    data = load_records(tmp_path / "s.parquet", get_adapter("text").check_record)
    assert len(data) == rows and len(data.records.rows.table.data.to_batches()) == 1


def test_a_builder_that_buffers_examples_keeps_its_own_writer_batch_size(tmp_path, monkeypatch):
    (tmp_path / "pictures").mkdir()
    for i in range(2):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "pictures" / f"{i}.png")
    asked = []
    real = datasets.load_dataset_builder
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: (asked.append(k), real(*a, **k))[1])
    assert len(_converted("imagefolder", data_dir=str(tmp_path / "pictures"), split="train")) == 2  # as a hub id
    datasets.Dataset.from_dict({"prompt": ["1="], "answer": ["1"]}).to_parquet(str(tmp_path / "s.parquet"))
    load_records(tmp_path / "s.parquet", get_adapter("text").check_record)
    assert [k.get("writer_batch_size") for k in asked] == [None, None, WRITER_BATCH_ROWS]


def test_a_hub_id_while_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data.train='someone/gsm8k-like' is not a local file or folder, and loading "
                                        r"it as a hub dataset failed .*HF_HUB_OFFLINE must be unset"):
        load_records("someone/gsm8k-like", get_adapter("text").check_record, role="data.train")


def _with_template(tiny_text: dict[str, Path], root: Path) -> dict[str, Path]:
    """The tiny teacher and student, copied with a chat template (the toy's tokenizer has none)."""
    paths = {}
    for role in ("teacher", "student"):
        paths[role] = Path(shutil.copytree(tiny_text[role], root / role))
        config = json.loads((paths[role] / "tokenizer_config.json").read_text())
        (paths[role] / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return paths


def _conversations(tiny_text: dict[str, Path]) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["answer"]}]} for r in _rows(tiny_text["train"])]


def test_messages_render_through_the_chat_template_and_train(text_config, tiny_text, tmp_path):
    paths = _with_template(tiny_text, tmp_path)
    conversations = _conversations(tiny_text)
    datasets.Dataset.from_list(conversations).save_to_disk(str(tmp_path / "chat"))
    config = text_config(**{"data.train": str(tmp_path / "chat"), "student.path": str(paths["student"]),
                            "teacher.path": str(paths["teacher"]), "data.eval": "", "objective.kind": "sft"})
    session = Session(config)
    record, tokenizer = session.train_data.records[0], session.student_processor
    expected = tokenizer.apply_chat_template(conversations[0]["messages"][:-1], tokenize=False,
                                             add_generation_prompt=True)
    assert prompt_text(record["prompt"], tokenizer) == expected == f"<system>Add.\n<user>{_rows(tiny_text['train'])[0]['prompt']}\n<assistant>"
    assert record["answer"] == conversations[0]["messages"][-1]["content"]
    assert mmopd.train(config)["steps"] == 2


def test_prompt_completion_pairs_are_a_prompt_and_an_answer(tiny_text, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pc.parquet"))
    record = load_records(tmp_path / "pc.parquet", get_adapter("text").check_record).records[0]
    assert record["prompt"] == [{"role": "user", "content": "1+1="}] and record["answer"] == "2"


def test_messages_without_an_assistant_turn_are_refused_where_an_answer_is_needed(text_config, tiny_text, tmp_path):
    paths = _with_template(tiny_text, tmp_path)
    rows = [{"messages": c["messages"][:-1]} for c in _conversations(tiny_text)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "prompts"))
    overrides = {"data.train": str(tmp_path / "prompts"), "student.path": str(paths["student"]),
                 "teacher.path": str(paths["teacher"]), "data.eval": ""}
    assert Session(text_config(**overrides)).train_data.records[0]["answer"] is None  # on_policy needs none
    with pytest.raises(DataError, match=r"prompts row 0: objective sft needs an 'answer' in every record \(a "
                                        r"conversational record: a last assistant turn\)"):
        Session(text_config(**overrides, **{"objective.kind": "sft"}))


@pytest.mark.parametrize("row", [
    {"prompt": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]},
    {"prompt": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
     "completion": [{"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"},
                  {"role": "assistant", "content": "4"}]},
], ids=["prompt", "prompt_and_completion", "messages_with_two_last_assistant_turns"])
def test_a_prompt_ending_with_the_assistants_turn_is_refused_naming_the_line(row, tmp_path):
    """The answer would be in the prompt the student and teacher read (and on_policy would never see it as one)."""
    good = {"prompt": [{"role": "user", "content": "1+2="}], "completion": [{"role": "assistant", "content": "3"}]}
    (tmp_path / "answered.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"answered\.jsonl:2: bad record: 'prompt' ends with an assistant turn, so "
                                        r"the answer would be in the prompt"):
        load_records(tmp_path / "answered.jsonl", get_adapter("text").check_record, role="data.train")


@pytest.mark.parametrize("name, content, expected", [
    ("bad.csv", b'prompt,answer\n"1+2=,3\n', r"bad\.csv cannot be read as a csv file \(ParserError: .*EOF"),
    ("header.csv", b"prompt,answer\n", r"header\.csv holds no usable records"),
    ("bad.json", b'{"prompt": "1+2=",\n', r"bad\.json cannot be read as a json file \(\w+: "),
    ("empty.json", b"", r"empty\.json holds no usable records \(an empty file\)"),
    ("schema.parquet", None, r"schema\.parquet holds no usable records \(a parquet file with a schema and no rows\)"),
])
def test_a_file_datasets_cannot_read_is_one_line_naming_it_and_the_cause(name, content, expected, tmp_path):
    """`datasets` fails inside its builder (DatasetGenerationError, or a bare StopIteration for an empty JSON file);
    the error names the file and the reader's own cause, never 'An error occurred while generating the dataset'."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if content is None:
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / name)
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"data\.train: .*{expected}") as caught:
        load_records(tmp_path / name, get_adapter("text").check_record, role="data.train")
    assert "\n" not in str(caught.value) and "An error occurred" not in str(caught.value)


@pytest.mark.parametrize("damage", ["truncated_arrow", "torn_state_json"])
def test_a_torn_save_to_disk_folder_is_one_line_naming_it(damage, tmp_path):
    folder = tmp_path / "set"
    datasets.Dataset.from_list([{"prompt": "1+2=", "answer": "3"}] * 50).save_to_disk(str(folder))
    if damage == "truncated_arrow":
        arrow = next(folder.glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    else:
        (folder / "state.json").write_text("{")
    with pytest.raises(DataError, match=r"data\.train: .*set is a save_to_disk folder that cannot be read \(\w+: .*\); "
                                        r"write it again with save_to_disk"):
        load_records(folder, get_adapter("text").check_record, role="data.train")
