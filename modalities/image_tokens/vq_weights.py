"""Reading a multimodal checkpoint's VQ weights without loading the rest of the model (a 7B language
model is not needed to turn codes into pixels)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from torch import nn
from transformers.utils import cached_file

MARKER = "vqmodel."  # Janus saves `model.vqmodel.*`, Emu3 `vqmodel.*`


def load_vq_weights(path: str, vq: nn.Module) -> nn.Module:
    """Fill `vq` with the checkpoint's `*vqmodel.*` tensors (sharded or not); refuse a partial fit."""
    index_file = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index_file is not None:
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if MARKER in key})
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        with safe_open(cached_file(path, shard), framework="pt") as f:
            state.update({key.split(MARKER, 1)[1]: f.get_tensor(key) for key in f.keys() if MARKER in key})
    missing, unexpected = vq.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint's VQ weights (*{MARKER}*) do not fit its vq_config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return vq.eval().requires_grad_(False)
