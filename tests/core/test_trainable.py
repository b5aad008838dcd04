"""What trains: `full` trains every weight, `lm_only` freezes a VLM's vision tower and projector, `lora`
trains peft adapters on the language model and checkpoints a merged model plus the adapters."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import mmopd
from mmopd.config import ConfigError

LANGUAGE_PREFIXES = {"llava": "model.language_model.", "qwen2_vl": "model.language_model."}
VISION_PREFIXES = {"llava": ("model.vision_tower.", "model.multi_modal_projector."), "qwen2_vl": ("model.visual.",)}


def _weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def _changed(before: dict, after: dict, prefixes: tuple[str, ...]) -> dict[str, bool]:
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith(prefixes)}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lm_only_freezes_the_vision_tower_and_projector_and_trains_the_language_model(family, vlm_config, tmp_path):
    config = vlm_config(family, **{"student.trainable": "lm_only", "train.steps": 1, "train.lr": 1e-2})
    mmopd.train(config)
    before = _weights(config.student.path)
    after = _weights(tmp_path / "run" / "checkpoints" / "step-1" / "model")
    vision = _changed(before, after, VISION_PREFIXES[family])
    language = _changed(before, after, (LANGUAGE_PREFIXES[family], "lm_head."))
    assert vision and not any(vision.values())
    assert sum(language.values()) > len(language) / 2


def test_lora_checkpoints_a_merged_model_and_its_adapters(vlm_config, tmp_path):
    config = vlm_config("llava", **{"student.trainable": "lora", "student.lora_rank": 4, "train.steps": 2,
                                    "train.lr": 1e-2})
    mmopd.train(config)
    step = tmp_path / "run" / "checkpoints" / "step-2"
    adapters = load_file(str(step / "lora" / "adapter_model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)
    before, merged = _weights(config.student.path), _weights(step / "model")  # a plain model, loaded by path
    assert set(before) == set(merged)
    assert not any(_changed(before, merged, VISION_PREFIXES["llava"]).values())
    projections = _changed(before, merged, ("model.language_model.layers.0.self_attn.q_proj.weight",))
    assert all(projections.values())
    assert not any(_changed(before, merged, ("model.language_model.norm.", "lm_head.")).values())


def test_a_lora_run_resumed_midway_ends_where_the_uninterrupted_run_ends(vlm_config, tmp_path):
    settings = {"student.trainable": "lora", "student.lora_rank": 4, "train.lr": 1e-2, "train.steps": 2,
                "train.save_every": 1}
    mmopd.train(vlm_config("llava", **settings, **{"train.out_dir": str(tmp_path / "whole")}))
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-1", tmp_path / "parts" / "checkpoints" / "step-1")
    mmopd.train(vlm_config("llava", **settings, **{"train.out_dir": str(tmp_path / "parts")}))  # resumes at step 1
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step-2" / "lora" / "adapter_model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "checkpoints" / "step-2" / "lora" / "adapter_model.safetensors"))
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_text_students_train_with_lora_too(text_config, tmp_path):
    summary = mmopd.train(text_config(**{"student.trainable": "lora", "student.lora_rank": 4}))
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "lora" / "adapter_config.json").is_file()


def test_lm_only_on_a_text_model_is_a_config_error_that_names_the_choices(text_config):
    with pytest.raises(ConfigError, match="student.trainable=lm_only is not supported by the text adapter; use full "
                                          "or lora"):
        mmopd.train(text_config(**{"student.trainable": "lm_only"}))
