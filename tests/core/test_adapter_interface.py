"""The small interfaces: the adapter protocol holds at most 12 methods, the HF model calls have one default
(`mmopd.models.hf.ModelCalls`), and what vLLM needs of a model family is keyed by the family in the engine code."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from torch import nn

from mmopd.config import ConfigError, load_config
from mmopd.engines.vllm import families
from mmopd.models.adapter import ModalityAdapter, get_adapter, prepare_trainable, settings_of
from mmopd.models.hf import ModelCalls


def _model(model_type: str, cls: type = nn.Module) -> nn.Module:
    model = cls()
    model.config = SimpleNamespace(model_type=model_type)
    return model


def test_the_adapter_protocol_has_at_most_12_methods_and_no_model_calls():
    methods = [name for name, value in vars(ModalityAdapter).items() if inspect.isfunction(value)]
    assert len(methods) <= 12, methods
    for name in ("configure", "load_model", "start", "response_logits", "engine_key", "vllm_unsupported"):
        assert not hasattr(ModalityAdapter, name), name
    assert isinstance(ModalityAdapter.calls, ModelCalls)


def test_every_modality_calls_its_models_through_one_modelcalls_default_or_subclass():
    for name in ("text", "vlm", "image_tokens"):
        assert isinstance(get_adapter(name).calls, ModelCalls), name
    assert type(get_adapter("text").calls) is ModelCalls  # a causal LM needs no override


def test_the_llava_key_layout_is_keyed_by_model_type_in_the_engine_code():
    llava, other = families.engine_key(_model("llava")), families.engine_key(_model("qwen2"))
    assert llava("vision_tower.encoder.layers.0.w") == "vision_tower.vision_model.encoder.layers.0.w"
    assert llava("vision_tower.vision_model.x") == "vision_tower.vision_model.x"
    assert llava("language_model.x") == "language_model.x"
    assert other("vision_tower.encoder.layers.0.w") == "vision_tower.encoder.layers.0.w"


def test_a_family_registers_its_refusal_once_and_served_pictures_are_refused_for_any_model():
    class TinyImageGenerator(nn.Module):
        pass

    assert families.vllm_unsupported(_model("tiny", TinyImageGenerator), served=False) is None
    families.register_unsupported("TinyImageGenerator")(lambda model, served: f"served={served}: not in vLLM")
    try:
        assert families.vllm_unsupported(_model("tiny", TinyImageGenerator), served=True) == "served=True: not in vLLM"
    finally:
        del families._REFUSALS["TinyImageGenerator"]
    assert families.vllm_unsupported(_model("qwen2"), served=True) is None
    assert families.vllm_unsupported(_model("qwen2"), served=True, pictures=True) == families.SERVED_PICTURES
    assert families.vllm_unsupported(_model("qwen2"), served=False, pictures=True) is None
    get_adapter("image_tokens")  # importing the modality registers the generators it drives
    assert {"JanusForConditionalGeneration", "Emu3ForConditionalGeneration"} <= families._REFUSALS.keys()
    assert get_adapter("vlm").prompt_pictures and not get_adapter("text").prompt_pictures


def test_a_modality_adds_trainable_modes_by_name_and_an_unknown_one_is_refused():
    config = load_config(None, {"modality": "text", "student.path": "unused", "teacher.path": "unused",
                                "data.train": "unused.jsonl"})
    model = nn.Linear(2, 2)
    assert prepare_trainable(get_adapter("text"), model, config.student) is model  # full
    student = SimpleNamespace(trainable="lm_only")
    with pytest.raises(ConfigError, match="student.trainable=lm_only is not supported by the text adapter"):
        prepare_trainable(get_adapter("text"), model, student)
    assert "lm_only" in get_adapter("vlm").trainable_modes
    settings = settings_of(config)
    assert settings.max_new_tokens == config.rollout.max_new_tokens and settings.student_path == "unused"
