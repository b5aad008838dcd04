"""The engine checkpoint: a model written as vLLM loads it (untied LM head, vLLM's key layout), for the engine's
start and for every weight sync of a full student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmopd.config import ConfigError
from mmopd.models.hf import base_model
from mmopd.models.sharding import same_parameter, write_full_model

UNTIED_HEAD_FILE = "lm-head-untied.safetensors"  # the untied LM head in an engine checkpoint
MARKER = ".mmopd-engine-checkpoint"  # marks a directory this module wrote, which the next write may replace


def make_room(directory: Path) -> None:
    """`directory`, new or emptied, with the marker: one written here before is replaced; any other non-empty path
    is refused, never deleted (it may hold a run's checkpoints)."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is a file; write the engine checkpoint into a new or empty directory")
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / MARKER).is_file():
            raise ConfigError(f"{directory} is not empty and is no engine checkpoint that mmopd wrote (it has no "
                              f"{MARKER}); nothing was deleted: write it into a new or empty directory")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("an engine checkpoint written by mmopd; the next one written here replaces it\n")


def write_engine_checkpoint(model: nn.Module, directory: Path, engine_key: Callable[[str], str],
                            processor: Any = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """`model` as vLLM loads it, in `directory`: `save_pretrained` (safetensors), with the LM head untied (vLLM's
    `reload_weights` never refreshes a tied head, so a tied engine would keep sampling from the start's head)
    and every key in the layout vLLM's loader reads (`engine_key`, the adapter's). The untied head goes in a file
    of its own (UNTIED_HEAD_FILE) beside save_pretrained's, which are read back and rewritten only where the engine
    names a key otherwise, and an index lists both. A sharded model's full `weights` come gathered
    (`sharding.full_state_dict`). A non-empty `directory` must be one written here before (`make_room`)."""
    base = base_model(model)
    make_room(directory)
    if weights is None:
        base.save_pretrained(directory, safe_serialization=True)
    else:
        write_full_model(base, directory, weights)
    if processor is not None:
        processor.save_pretrained(directory)
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head is not None and embed is not None and same_parameter(head.weight, embed.weight)
    head_key = next(name for name, module in base.named_modules() if module is head) + ".weight" if tied else None
    index_path = directory / "model.safetensors.index.json"
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"] if index_path.exists() else {}
    if (directory / "model.safetensors").exists():  # a single file: transformers would read it and not the index
        (directory / "model.safetensors").rename(directory / "model-body.safetensors")
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as opened:
            keys = list(opened.keys())
        weight_map.update({key: file.name for key in keys})
        if any(engine_key(k) != k for k in keys):  # only shards that vLLM names otherwise are read and rewritten
            save_file({engine_key(k): v for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    if head_key is not None:  # the head in a file of its own, beside the shards that save_pretrained wrote
        head_weight = head.weight.detach() if weights is None else weights[head_key]
        save_file({engine_key(head_key): head_weight.cpu().contiguous()}, directory / UNTIED_HEAD_FILE,
                  metadata={"format": "pt"})
        weight_map[head_key] = UNTIED_HEAD_FILE
    # an index over every file, so that transformers reads the head's file too, as vLLM does
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": {engine_key(k): v for k, v in
                                                                     sorted(weight_map.items())}}, indent=2))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in section or section is config:
            section["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def ties_head(directory: Path) -> bool:
    """Whether the checkpoint in `directory` ties its LM head to its input embeddings (its config says so)."""
    config = json.loads((directory / "config.json").read_text())
    return bool(config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"))
