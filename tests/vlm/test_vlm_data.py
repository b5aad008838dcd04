"""VLM records: image files are checked when the data loads (errors name the file and the line), odd
image modes become RGB, bad records can be skipped and counted, and answers match exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmopd
from mmopd.data.records import DataError, RecordError, load_jsonl
from mmopd.models.adapter import ModelLoadError, get_adapter
from mmopd.models.compat import IncompatibleModelsError
from modalities.vlm import images
from modalities.vlm.families import FAMILIES
from modalities.vlm.images import load_rgb


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grayscale_rgba_and_palette_images_load_as_rgb(tmp_path):
    Image.new("L", (4, 4), 90).save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent
    rgba.save(tmp_path / "rgba.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    gray, over_white, paletted = (load_rgb(tmp_path / n) for n in ("gray.png", "rgba.png", "palette.png"))
    assert {im.mode for im in (gray, over_white, paletted)} == {"RGB"}
    assert gray.getpixel((1, 1)) == (90, 90, 90)
    assert over_white.getpixel((0, 0)) == (255, 255, 255) and over_white.getpixel((1, 1)) == (200, 10, 10)
    assert paletted.getpixel((2, 2)) == (10, 200, 30)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_a_16_bit_grayscale_png_keeps_its_values_scaled_to_8_bits(mode, tmp_path):
    """Pillow's RGB conversion of a 16-bit picture clips every value above 255 to white; the values are scaled
    instead (v >> 8: 16-bit 0, 4369, ..., 65535 become 0, 17, ..., 255). A PNG opens as I;16 (or I in older Pillow)."""
    import numpy as np
    values = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0 .. 65535
    Image.fromarray(values).save(tmp_path / "gray16.png")
    opened = Image.open(tmp_path / "gray16.png")
    picture = opened if mode == "I;16" else opened.convert("I")
    assert picture.mode == mode
    got = np.asarray(load_rgb(picture if mode == "I" else tmp_path / "gray16.png"))
    assert got.shape == (4, 4, 3) and (got == (values >> 8)[..., None]).all()

@pytest.mark.parametrize("bad, expected", [("missing", "image not found"), ("corrupt", "cannot read image"),
                                           ("empty", "0 bytes")])
def test_a_bad_image_is_an_error_naming_the_file_and_the_line(bad, expected, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    path = _write(tmp_path / "data.jsonl", [{"images": ["good.png"], "prompt": "q"},
                                            {"images": ["good.png", f"{bad}.png"], "prompt": "q"}])
    with pytest.raises(DataError) as err:
        load_jsonl(path, get_adapter("vlm").check_record)
    message = str(err.value)
    assert f"{path}:2:" in message and str(tmp_path / f"{bad}.png") in message and expected in message
    assert "data.skip_bad=true" in message


def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 63)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "big.png")
    path = _write(tmp_path / "data.jsonl", [{"images": ["big.png"], "prompt": "q"}])
    with pytest.raises(DataError, match=r"data.jsonl:1:.*too large \(8x8 = 64 pixels, limit 63\)"):
        load_jsonl(path, get_adapter("vlm").check_record)


def test_skip_bad_drops_and_counts_each_bad_record(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    path = _write(tmp_path / "data.jsonl", [{"images": ["good.png"], "prompt": "q"},
                                            {"images": ["nowhere.png"], "prompt": "q"},
                                            {"images": ["empty.png"], "prompt": "q"},
                                            {"images": [], "prompt": "q"},
                                            {"images": ["good.png"], "prompt": "q2", "answer": "red"}])
    data = load_jsonl(path, get_adapter("vlm").check_record, skip_bad=True)
    assert data.skipped == 3
    assert [r["prompt"] for r in data.records] == ["q", "q2"]
    assert data.records[0]["images"] == [str((tmp_path / "good.png").resolve())]  # relative to the JSONL file


@pytest.mark.parametrize("raw, expected", [({"images": ["a.png"]}, "missing 'prompt'"),
                                           ({"prompt": "q"}, "non-empty list of image paths"),
                                           ({"prompt": "q", "images": "a.png"}, "non-empty list of image paths"),
                                           ({"prompt": "q", "images": ["a.png"], "answer": 3}, "'answer' must be")])
def test_malformed_records_are_rejected_with_a_hint(raw, expected, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    with pytest.raises(RecordError, match=expected):
        get_adapter("vlm").check_record(raw, tmp_path)


def test_a_training_run_skips_bad_records_and_reports_how_many(vlm_config, vlm_data, tmp_path):
    rows = [json.loads(line) for line in vlm_data["train"].read_text().splitlines()]
    rows[3]["images"] = ["img/deleted.png"]
    path = _write(vlm_data["train"].parent / "with_bad.jsonl", rows)
    summary = mmopd.train(vlm_config("llava", **{"data.train": str(path), "data.skip_bad": True, "train.steps": 1}))
    assert summary["skipped_records"] == 1 and summary["steps"] == 1


def test_exact_match_ignores_case_and_surrounding_whitespace():
    records = [{"answer": "Square  Red"}, {"answer": "3"}, {"answer": "circle left"}]
    assert get_adapter("vlm").score(records, [" square red", "3 ", "circle right"]) == {"accuracy": 2 / 3}


@pytest.mark.parametrize("family", FAMILIES)
def test_image_placeholders_are_outside_the_action_space(family, vlm_pair):
    adapter = get_adapter("vlm")
    path = str(vlm_pair(family)["student"])
    processor, model = adapter.load_processor(path, "student"), adapter.calls.load_model(path, "student", torch.float32)
    space = adapter.token_space(processor, model)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert image_id in adapter.placeholder_ids(processor, model)
    assert image_id not in space.ids.tolist()
    assert space.size == len(processor.tokenizer) - len(adapter.placeholder_ids(processor, model))


def test_answers_end_with_the_chat_templates_end_of_turn_token(vlm_pair):
    adapter = get_adapter("vlm")
    processor = adapter.load_processor(str(vlm_pair("gemma3")["student"]), "student")
    tok = processor.tokenizer
    tok.eos_token = "<eos>"  # as in real Gemma 3: EOS differs from the end of a chat turn
    end_of_turn, eos = tok.convert_tokens_to_ids(["<end_of_turn>", "<eos>"])
    assert adapter.eos_token_ids(processor) == [end_of_turn, eos]
    assert adapter.encode_answers([{"answer": "red"}], processor) == [[tok.convert_tokens_to_ids("red"), end_of_turn]]


def test_a_processor_without_a_chat_template_is_refused(vlm_pair, tmp_path):
    adapter = get_adapter("vlm")
    processor = adapter.load_processor(str(vlm_pair("llava")["student"]), "student")
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    processor.save_pretrained(tmp_path / "plain")
    for leftover in tmp_path.glob("plain/*chat_template*"):
        leftover.unlink()
    with pytest.raises(ModelLoadError, match="no chat_template"):
        adapter.load_processor(str(tmp_path / "plain"), "student")


def test_teacher_and_student_with_different_tokenizers_are_refused(vlm_pair):
    adapter = get_adapter("vlm")
    student, teacher = str(vlm_pair("llava")["student"]), str(vlm_pair("qwen2_vl")["teacher"])
    with pytest.raises(IncompatibleModelsError, match="tokenizers differ"):
        adapter.check_pair(adapter.load_processor(student, "student"), adapter.load_processor(teacher, "teacher"),
                           adapter.calls.load_model(student, "student", torch.float32),
                           adapter.calls.load_model(teacher, "teacher", torch.float32))
