"""The served teacher's LM head, read from its checkpoint alone: a vLLM teacher that sends its last hidden states
leaves the trainer to turn them into logits, so the trainer holds a copy of the head (never the whole teacher)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers.utils import cached_file

from mmopd.config import ConfigError
from mmopd.models.hf import base_model, text_config

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


@dataclass
class TeacherHead:
    """logits = hidden·weightᵀ + bias, as the teacher's own head computes them."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V] or None


def load_head(path: str, skeleton: nn.Module, dtype: torch.dtype) -> TeacherHead:
    """The LM head of the teacher at `path` (a folder or a hub id holding its safetensors), found by the key of the
    skeleton's output embeddings, or, where the model ties them, of its input embeddings; in `dtype`."""
    base = base_model(skeleton)
    names = {id(module): name for name, module in base.named_modules()}
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    keys = [f"{names[id(head)]}.weight"]
    if getattr(text_config(skeleton), "tie_word_embeddings", False) and embed is not None:
        keys.append(f"{names[id(embed)]}.weight")  # a tied checkpoint stores the embeddings only
    files = _weight_files(path)
    found = next(((key, files[key]) for key in keys if key in files), None)
    if found is None:
        raise ConfigError(f"teacher.path={path!r} holds no LM head ({' or '.join(keys)}) in its safetensors; a vLLM "
                          "teacher that sends hidden states needs the teacher's checkpoint there (its head is read "
                          "from it), or set teacher.top_k: K")
    key, bias_key = found[0], f"{names[id(head)]}.bias"
    weight = _tensor(files, key, dtype)
    bias = _tensor(files, bias_key, dtype) if getattr(head, "bias", None) is not None else None
    if weight.shape != head.weight.shape:
        raise ConfigError(f"teacher.path={path!r}: its {key} is {tuple(weight.shape)}, but its config makes the "
                          f"head {tuple(head.weight.shape)}")
    return TeacherHead(weight, bias)


def _tensor(files: dict[str, str], key: str, dtype: torch.dtype) -> Tensor:
    if key not in files:
        raise ConfigError(f"the teacher's checkpoint has no {key}, which its config's LM head needs")
    with safe_open(files[key], "pt") as weights:
        return weights.get_tensor(key).to(dtype)


def _weight_files(path: str) -> dict[str, str]:
    """Each tensor key of the checkpoint at `path` -> the safetensors file holding it ({} when it has none)."""
    index = cached_file(path, INDEX, _raise_exceptions_for_missing_entries=False)
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        where = {name: cached_file(path, name) for name in set(weight_map.values())}
        return {key: where[name] for key, name in weight_map.items()}
    single = cached_file(path, SINGLE, _raise_exceptions_for_missing_entries=False)
    if single is None:
        return {}
    with safe_open(single, "pt") as weights:
        return dict.fromkeys(weights.keys(), single)
