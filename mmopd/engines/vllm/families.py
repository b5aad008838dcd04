"""What vLLM takes of each model family, keyed by the family (the model's transformers class, or its config's
`model_type`), in the engine code rather than on the modality adapters: the checkpoint key layout vLLM's loader reads
(`engine_key`), and the families a vLLM engine cannot sample from (`vllm_unsupported`). A modality registers the
families it drives at import (`register_engine_key`, `register_unsupported`)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from mmopd.models.hf import base_model

KeyMap = Callable[[str], str]  # a checkpoint key as transformers writes it -> as vLLM's loader reads it
Refusal = Callable[[nn.Module, bool], "str | None"]  # (model, served) -> why vLLM cannot sample from it, or None

_KEY_MAPS: dict[str, KeyMap] = {}  # model_type -> its key map
_REFUSALS: dict[str, Refusal] = {}  # model class name or model_type -> its refusal

# the message of a rollout that sends pictures to a served engine (see `pictures_unsupported`)
SERVED_PICTURES = ("a served vLLM takes token-id prompts without pictures over /v1/completions; sample from a "
                   "colocated vLLM (leave rollout.url empty), which takes the student's ids with multi_modal_data")


def register_engine_key(model_type: str) -> Callable[[KeyMap], KeyMap]:
    """Register how vLLM names the checkpoint keys of models of `model_type` (the default: as transformers does)."""
    def decorate(key_map: KeyMap) -> KeyMap:
        _KEY_MAPS[model_type] = key_map
        return key_map
    return decorate


def register_unsupported(*families: str) -> Callable[[Refusal], Refusal]:
    """Register why vLLM cannot sample from models of these families (transformers class names or model types)."""
    def decorate(refusal: Refusal) -> Refusal:
        _REFUSALS.update(dict.fromkeys(families, refusal))
        return refusal
    return decorate


def _families(model: nn.Module) -> list[str]:
    base = base_model(model)
    return [cls.__name__ for cls in type(base).__mro__] + [getattr(base.config, "model_type", "")]


def engine_key(model: nn.Module) -> KeyMap:
    """The key map of `model`'s family: a checkpoint key of `model` as vLLM's loader names it."""
    return _KEY_MAPS.get(getattr(base_model(model).config, "model_type", ""), _same_key)


def _same_key(key: str) -> str:
    return key


def vllm_unsupported(model: nn.Module, served: bool, pictures: bool = False) -> str | None:
    """Why vLLM cannot sample from `model` (served: from a `vllm serve` over token-id completions; pictures: with
    prompts that carry pictures); None: it can. Any HF causal LM can, unless its family is registered otherwise."""
    if served and pictures:
        return SERVED_PICTURES
    for family in _families(model):
        if family in _REFUSALS:
            return _REFUSALS[family](model, served)
    return None


@register_engine_key("llava")
def _llava_key(key: str) -> str:
    """LLaVA's CLIP/SigLIP tower as the hub's llava-hf checkpoints (and vLLM) name it: vision_tower.vision_model.*
    (transformers writes vision_tower.* and reads both)."""
    prefix = "vision_tower."
    if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + key[len(prefix):]
    return key
