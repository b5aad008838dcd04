"""LoRA students through peft: adapters on the language model's linear layers, merged saves, resume.

A LoRA checkpoint holds the adapter weights (`lora/`, what a resumed run loads on top of the original
student) and the merged model (`model/`, a plain `save_pretrained` model that loads by path anywhere).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import Tensor, nn


def is_lora(model: nn.Module) -> bool:
    """Whether `model` is a peft-wrapped model (checked without importing peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def linear_layers_of_language_model(model: nn.Module) -> list[str]:
    """Full names of the nn.Linear modules inside `model.get_decoder()`: the LoRA targets."""
    decoder = model.get_decoder()
    inside = {id(m) for m in decoder.modules()}
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]
    if not names:
        raise ValueError(f"{type(model).__name__}: no linear layers found in its language model for LoRA")
    return names


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> nn.Module:
    """Wrap `model` in peft LoRA adapters on `targets`; only the adapters train (B starts at zero, so
    the wrapped model computes exactly what the original did)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, config)


def merged_model(model: nn.Module) -> nn.Module:
    """A plain copy of a LoRA model with the adapters folded into the weights (the original is untouched)."""
    return copy.deepcopy(model).merge_and_unload()


def merged_weights(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The plain model's state dict with the adapters folded in, from a LoRA model's full `weights` (a sharded
    student's, gathered): W + scaling · B A for every adapted linear layer, under the base model's key names."""
    scalings = {name: module.scaling["default"] for name, module in model.named_modules()
                if hasattr(module, "lora_A") and hasattr(module, "scaling")}
    merged = {}
    for key, value in weights.items():
        if ".lora_" in key:
            continue
        layer, _, kind = key.rpartition(".")
        if layer.endswith(".base_layer") and kind == "weight":
            name = layer.removesuffix(".base_layer")
            a, b = weights[f"{name}.lora_A.default.weight"], weights[f"{name}.lora_B.default.weight"]
            value = (value.float() + scalings[name] * (b.float() @ a.float())).to(value.dtype)
        merged[key.replace(".base_layer.", ".").removeprefix("base_model.model.")] = value
    return merged


def load_lora_weights(model: nn.Module, path: str | Path) -> None:
    """Load adapter weights saved by `model.save_pretrained(path)` into a model wrapped with the same targets."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"LoRA weights in {path} do not fit the student (missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}); resume with the same student and LoRA settings")
