"""A tiny Gemma 3 pair built offline with the real classes: what Gemma 3 270M brings (sliding-window layers, a
scaled tied embedding, BOS/EOS/PAD ids 2/1/0, a tokenizer that adds BOS and pads on the right), at 4 layers
and 32 wide."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

CHARS = list("abcdefghijklmnopqrstuvwxyz .,?!0123456789")
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2, 3 as in Gemma's vocabulary
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
WINDOW = 4


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Char-level, BOS prepended, padding on the right (as Gemma's tokenizer may ship)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>", padding_side="right")


def build_model(seed: int = 0, layer_types: list[str] | None = None) -> transformers.Gemma3ForCausalLM:
    """Random Gemma3ForCausalLM: 4 layers (one full-attention), window 4, tied embeddings, fp32, eval mode."""
    layer_types = layer_types or LAYER_TYPES
    config = transformers.Gemma3TextConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        layer_types=list(layer_types), max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model.eval()


def save_pair(out: Path) -> dict[str, Path]:
    """A teacher and a different student (same vocabulary), each saved with the tokenizer."""
    tokenizer = build_tokenizer()
    paths = {}
    for role, seed in (("teacher", 0), ("student", 1)):
        build_model(seed).save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        paths[role] = out / role
    return paths
