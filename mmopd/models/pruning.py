"""Depth pruning: a student made from its teacher by keeping some of its decoder layers (as Minitron and
DistilBERT start theirs). The kept layers keep their weights and their attention types (a sliding-window layer
stays one); their cache indices and the config follow the new depth.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmopd.models.hf import text_config
from mmopd.models.sharding import decoder_layers


class PruneError(ValueError):
    """A keep list or a model that depth pruning cannot work with, in one line."""


FULL_ATTENTION = "full_attention"


def parse_keep(text: str) -> list[int]:
    """`"0,2,5"` -> [0, 2, 5] (the CLI's --keep)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PruneError(f"--keep must be comma-separated layer indices such as 0,2,5, got {text!r}") from None


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The nn.ModuleList that holds the model's decoder layers, in order."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        layers = []
    ids = [id(layer) for layer in layers]
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and [id(m) for m in module] == ids:
            return module
    raise PruneError(f"{type(model).__name__}: found no nn.ModuleList of decoder layers (the classes its "
                     "_no_split_modules names) to prune")


def check_keep(keep: list[int], depth: int, layer_types: list[str] | None) -> None:
    """Refuse a keep list that is empty, unsorted, repeated or out of range, or that leaves no full-attention layer
    in a model whose layers have attention types."""
    if not keep:
        raise PruneError(f"keep names no layer; give the indices of the layers to keep, from 0 to {depth - 1}")
    bad = [i for i in keep if not 0 <= i < depth]
    if bad:
        raise PruneError(f"keep names layers {bad}, outside the model's {depth} layers (0 to {depth - 1})")
    if len(set(keep)) != len(keep):
        raise PruneError(f"keep names a layer twice: {keep}")
    if keep != sorted(keep):
        raise PruneError(f"keep must list layers in increasing order (they run in that order), got {keep}; "
                         f"use {sorted(keep)}")
    if layer_types and FULL_ATTENTION in layer_types and all(layer_types[i] != FULL_ATTENTION for i in keep):
        full = [i for i, kind in enumerate(layer_types) if kind == FULL_ATTENTION]
        raise PruneError(f"keep {keep} leaves no full_attention layer (only sliding-window ones); keep at least one "
                         f"of {full}")


def prune_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder layers `keep` (increasing indices), in place, and return the model.

    Each kept layer's `layer_idx` (in it and its attention, the KV-cache slot) becomes its new index;
    `config.num_hidden_layers` and `config.layer_types` follow. Embeddings, the final norm and the LM head are
    untouched, so tied embeddings stay tied."""
    layers = layer_list(model)
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != len(layers):
        raise PruneError(f"config.layer_types lists {len(layer_types)} layers, but the model holds {len(layers)}")
    check_keep(list(keep), len(layers), layer_types)
    kept = [layers[i] for i in keep]
    for new, (old, layer) in enumerate(zip(keep, kept)):
        for module in layer.modules():
            if getattr(module, "layer_idx", None) == old:
                module.layer_idx = new
    for i in reversed(range(len(layers))):  # the same list object the model holds, re-filled
        del layers[i]
    layers.extend(kept)
    config.num_hidden_layers = len(kept)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
    return model


def prune_checkpoint(src: str | Path, out: str | Path, keep: list[int], dtype: str = "float32") -> str:
    """Load the causal LM at `src`, keep its layers `keep`, save model and tokenizer in `out`; returns what it kept,
    in words."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PruneError(f"{out} is not empty; save the pruned model into a new or empty directory")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    depth = len(layer_list(model))
    prune_layers(model, keep)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return f"layers {keep} of {depth}"
