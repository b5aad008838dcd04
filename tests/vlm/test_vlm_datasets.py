"""VLM records as users have them: pictures as `datasets` Image features (bytes), one Image column mapped
onto `images`, TRL conversations whose {"type": "image"} parts take the `images` in order and render through
each processor's own chat template; a bad picture or a part/picture mismatch names the row."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

import mmopd
from mmopd.data.records import DataError, load_records
from mmopd.data.step_order import step_indices
from mmopd.models.adapter import get_adapter
from mmopd.run.objectives import Plan, Timer, objective_step
from mmopd.run.session import Session
from modalities.vlm.adapter import prompt_text
from modalities.vlm.images import load_rgb

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = datasets.Sequence(datasets.Image())


def _rows(jsonl: Path) -> list[dict]:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return [{**r, "images": [{"bytes": (jsonl.parent / p).read_bytes(), "path": None} for p in r["images"]]}
            for r in rows]


def _table(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows).cast_column("images", IMAGES)


def _conversation(row: dict) -> dict:
    """A system turn and two user turns, each with a picture; the last assistant turn is the answer."""
    picture = row["images"][0]
    return {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in two words."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a picture"}]},
        {"role": "user", "content": [{"type": "text", "text": row["prompt"]}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}],
        "images": [picture, picture]}


def test_image_features_give_the_jsonls_first_step_loss_and_train(vlm_config, vlm_data, tmp_path):
    _table(_rows(vlm_data["train"])).save_to_disk(str(tmp_path / "disk"))
    losses, answers = [], []
    for source in (vlm_data["train"], tmp_path / "disk"):
        config = vlm_config("llava", **{"data.train": str(source)})
        session = Session(config)
        batch = [session.train_data.records[i] for i in step_indices(len(session.train_data), 0, 2, 0)]
        answers.append([r["answer"] for r in batch])
        row = objective_step(session.models(), batch, Plan.of(config), torch.Generator().manual_seed(0), Timer(),
                             lambda loss: None)
        losses.append(row["loss"])
    assert answers[0] == answers[1] and losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert mmopd.train(vlm_config("llava", **{"data.train": str(tmp_path / "disk"), "train.steps": 1}))["steps"] == 1


def test_one_image_column_maps_onto_images(vlm_data, tmp_path):
    rows = [{"question": r["prompt"], "solution": r["answer"], "image": r["images"][0]} for r in _rows(vlm_data["train"])]
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "one.parquet"))
    data = load_records(tmp_path / "one.parquet", get_adapter("vlm").check_record,
                        fields={"prompt": "question", "answer": "solution", "images": "image"})
    first = data.records[0]
    assert first["prompt"] == rows[0]["question"] and first["answer"] == rows[0]["solution"]
    jsonl = load_records(vlm_data["train"], get_adapter("vlm").check_record).records[0]
    assert load_rgb(first["images"][0]).tobytes() == load_rgb(jsonl["images"][0]).tobytes()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_conversation_renders_as_the_processor_renders_it(family, vlm_pair, vlm_data, tmp_path):
    rows = [_conversation(r) for r in _rows(vlm_data["train"])[:3]]
    _table(rows).save_to_disk(str(tmp_path / "chat"))
    adapter = get_adapter("vlm")
    processor = adapter.load_processor(str(vlm_pair(family)["student"]), "student")
    record = load_records(tmp_path / "chat", adapter.check_record).records[0]
    expected = processor.apply_chat_template(rows[0]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert prompt_text(record, processor) == expected
    assert record["answer"] == rows[0]["messages"][-1]["content"][0]["text"]
    pictures = [load_rgb(p) for p in record["images"]]
    direct = processor(text=[expected], images=[pictures], return_tensors="pt",
                       add_special_tokens=not expected.startswith(processor.tokenizer.bos_token or "\0"))
    assert torch.equal(adapter.encode_prompts([record], processor).input_ids, direct["input_ids"])


def test_a_conversational_set_trains(vlm_config, vlm_data, tmp_path):
    _table([_conversation(r) for r in _rows(vlm_data["train"])]).save_to_disk(str(tmp_path / "chat"))
    config = vlm_config("qwen2_vl", **{"data.train": str(tmp_path / "chat"), "train.steps": 1,
                                      "objective.kind": "supervised_kd"})
    assert mmopd.train(config)["steps"] == 1


@pytest.mark.parametrize("pictures, parts", [(1, 2), (3, 2)])
def test_image_parts_and_pictures_must_pair_up(pictures, parts, vlm_data, tmp_path):
    row = _conversation(_rows(vlm_data["train"])[0])
    row["images"] = [row["images"][0]] * pictures
    _table([_conversation(_rows(vlm_data["train"])[1]), row]).save_to_disk(str(tmp_path / "chat"))
    with pytest.raises(DataError, match=rf"chat row 1: bad record: the messages hold {parts} \{{\"type\": \"image\"\}} "
                                        rf"parts but the record has {pictures} images"):
        load_records(tmp_path / "chat", get_adapter("vlm").check_record)


def test_a_non_image_in_an_image_column_names_the_row_or_is_skipped(vlm_data, tmp_path):
    rows = _rows(vlm_data["train"])[:3]
    rows[2]["images"] = [{"bytes": b"these bytes are no picture", "path": None}]
    _table(rows).to_parquet(str(tmp_path / "bad.parquet"))
    check = get_adapter("vlm").check_record
    with pytest.raises(DataError, match=r"bad\.parquet row 2: bad record: cannot read image \(26 bytes\)"):
        load_records(tmp_path / "bad.parquet", check)
    assert load_records(tmp_path / "bad.parquet", check, skip_bad=True).skipped == 1


def test_a_picture_url_while_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "urls.jsonl").write_text(json.dumps({"prompt": "q", "images": ["https://example.com/a.png"]}) + "\n")
    with pytest.raises(DataError, match=r"urls\.jsonl:1: bad record: cannot fetch image https://example.com/a.png: "
                                        r"HF_HUB_OFFLINE is set \(offline\)"):
        load_records(tmp_path / "urls.jsonl", get_adapter("vlm").check_record)
