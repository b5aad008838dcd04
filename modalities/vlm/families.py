"""Tiny vision-language models of real transformers families, built offline.

Each builder makes a model from its family's real config class, a word-level tokenizer (built with
`tokenizers`) carrying the family's special tokens, and the family's real processor classes with a
chat template in the family's style. `save_family_model` writes both with `save_pretrained`, so
`AutoModelForImageTextToText` / `AutoProcessor` load them back by path like any hub checkpoint.

`image_tokens` (4 or 16) sets how many LM tokens one image becomes: the image resolution follows from
it, so a teacher may read the same picture at a higher resolution than its student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "idefics3", "llava", "gemma3")
IMAGE_TOKENS = (4, 16)
TEMPLATE_WORDS = ["user", "assistant", "model", ":", "system"]


@dataclass(frozen=True)
class Dims:
    """Widths and depths of one tiny model (language model, then vision tower)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class Built:
    model: transformers.PreTrainedModel
    processor: Any


def build_family_model(family: str, words: list[str], dims: Dims = Dims(), image_tokens: int = 4,
                       seed: int = 0) -> Built:
    """A randomly initialised tiny model of `family` and its processor, over `words` plus specials."""
    if family not in BUILDERS:
        raise ValueError(f"unknown VLM family {family!r}; available: {', '.join(FAMILIES)}")
    if image_tokens not in IMAGE_TOKENS:
        raise ValueError(f"image_tokens must be one of {IMAGE_TOKENS}, got {image_tokens}")
    if dims.hidden % dims.heads or dims.heads % dims.kv_heads:
        raise ValueError(f"hidden ({dims.hidden}) must divide by heads ({dims.heads}), heads by kv_heads")
    torch.manual_seed(seed)
    built = BUILDERS[family](words, dims, image_tokens)
    built.model.eval()
    return built


def save_family_model(built: Built, path: str | Path) -> Path:
    """Write model and processor with save_pretrained; load them back with the Auto classes."""
    path = Path(path)
    built.model.save_pretrained(path)
    built.processor.save_pretrained(path)
    return path


# --- tokenizer ---------------------------------------------------------------------------------
def word_tokenizer(words: list[str], specials: list[str], **named: str) -> PreTrainedTokenizerFast:
    """Word-level, lower-cased tokenizer: specials first, then the template words and `words`.

    `named` maps tokenizer attributes (pad_token, eos_token, bos_token, image_token, ...) to specials."""
    vocab: dict[str, int] = {}
    for token in ["<unk>", *specials, *TEMPLATE_WORDS, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    core = {k: v for k, v in named.items() if k in ("pad_token", "eos_token", "bos_token")}
    extra = {k: v for k, v in named.items() if k not in core}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", padding_side="left",
                                        model_max_length=4096, extra_special_tokens=extra, **core)
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    return tokenizer


def _ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    return 8 * math.ceil(len(tokenizer) / 8)


def _side(image_tokens: int) -> int:
    """Image tokens per side of the (square) token grid."""
    return math.isqrt(image_tokens)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


# --- Qwen2-VL, Qwen2.5-VL, Qwen3-VL ----------------------------------------------------------------
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    return word_tokenizer(words, QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                          image_token="<|image_pad|>", video_token="<|video_pad|>",
                          vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>")


def _qwen_token_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {"image_token_id": image, "video_token_id": video, "vision_start_token_id": start,
            "vision_end_token_id": end}


def _qwen_text(tokenizer: PreTrainedTokenizerFast, dims: Dims, **extra: Any) -> dict[str, Any]:
    return {"vocab_size": _vocab_size(tokenizer), "hidden_size": dims.hidden, "intermediate_size": dims.intermediate,
            "num_hidden_layers": dims.layers, "num_attention_heads": dims.heads,
            "num_key_value_heads": dims.kv_heads, "max_position_embeddings": 512, **_special_ids(tokenizer), **extra}


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of head_dim/2 rotary frequencies, as Qwen's [16, 24, 24] for 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen2_processor(tokenizer: PreTrainedTokenizerFast, image_tokens: int, processor_cls: type) -> Any:
    pixels = (28 * _side(image_tokens)) ** 2  # merged 2×2 patches of 14 px
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14,
                                                         merge_size=2, temporal_patch_size=2)
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                         video_processor=transformers.Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)


def _qwen2_vl(words: list[str], dims: Dims, image_tokens: int) -> Built:
    tokenizer = _qwen_tokenizer(words)
    config = transformers.Qwen2VLConfig(
        text_config=_qwen_text(tokenizer, dims, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": _mrope_section(dims.head_dim)}),
        vision_config={"depth": dims.vision_layers, "embed_dim": dims.vision_hidden, "hidden_size": dims.hidden,
                       "num_heads": dims.vision_heads, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        **_qwen_token_config(tokenizer), **_special_ids(tokenizer))
    model = transformers.Qwen2VLForConditionalGeneration(config)
    return Built(model, _qwen2_processor(tokenizer, image_tokens, transformers.Qwen2VLProcessor))


def _qwen2_5_vl(words: list[str], dims: Dims, image_tokens: int) -> Built:
    tokenizer = _qwen_tokenizer(words)
    config = transformers.Qwen2_5_VLConfig(
        text_config=_qwen_text(tokenizer, dims, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": _mrope_section(dims.head_dim)}),
        vision_config={"depth": dims.vision_layers, "hidden_size": dims.vision_hidden, "out_hidden_size": dims.hidden,
                       "intermediate_size": 2 * dims.vision_hidden, "num_heads": dims.vision_heads,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [dims.vision_layers - 1]},
        **_qwen_token_config(tokenizer), **_special_ids(tokenizer))
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    return Built(model, _qwen2_processor(tokenizer, image_tokens, transformers.Qwen2_5_VLProcessor))


def _qwen3_vl(words: list[str], dims: Dims, image_tokens: int) -> Built:
    tokenizer = _qwen_tokenizer(words)
    side = 32 * _side(image_tokens)  # merged 2×2 patches of 16 px
    config = transformers.Qwen3VLConfig(
        text_config=_qwen_text(tokenizer, dims, head_dim=dims.head_dim,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": _mrope_section(dims.head_dim),
                                                "mrope_interleaved": True}),
        vision_config={"depth": dims.vision_layers, "hidden_size": dims.vision_hidden, "out_hidden_size": dims.hidden,
                       "intermediate_size": 2 * dims.vision_hidden, "num_heads": dims.vision_heads, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
                       "deepstack_visual_indexes": [0]},
        **_qwen_token_config(tokenizer))
    model = transformers.Qwen3VLForConditionalGeneration(config)
    image_processor = transformers.Qwen2VLImageProcessor(size={"shortest_edge": side * side, "longest_edge": side * side},
                                                         patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = transformers.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                              video_processor=transformers.Qwen3VLVideoProcessor(patch_size=16),
                                              chat_template=QWEN_TEMPLATE)
    return Built(model, processor)


# --- Idefics3 and SmolVLM ------------------------------------------------------------------------
IDEFICS_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                    "<global-img>", "<image>"]
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _idefics_like(words: list[str], dims: Dims, image_tokens: int, smol: bool) -> Built:
    tokenizer = word_tokenizer(words, IDEFICS_SPECIALS, pad_token="<|endoftext|>", eos_token="<end_of_utterance>",
                               image_token="<image>", fake_image_token="<fake_token_around_image>",
                               global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>")
    side = 16 * _side(image_tokens)  # 8 px patches, pixel-shuffled by 2
    text = transformers.LlamaConfig(vocab_size=_vocab_size(tokenizer), hidden_size=dims.hidden,
                                    intermediate_size=dims.intermediate, num_hidden_layers=dims.layers,
                                    num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
                                    max_position_embeddings=512, **_special_ids(tokenizer))
    vision = {"hidden_size": dims.vision_hidden, "intermediate_size": 2 * dims.vision_hidden,
              "num_hidden_layers": dims.vision_layers, "num_attention_heads": dims.vision_heads,
              "image_size": side, "patch_size": 8}
    config_cls = transformers.SmolVLMConfig if smol else transformers.Idefics3Config
    config = config_cls(text_config=text, vision_config=vision, scale_factor=2,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    model_cls = transformers.SmolVLMForConditionalGeneration if smol else transformers.Idefics3ForConditionalGeneration
    model = model_cls(config)
    image_cls = transformers.SmolVLMImageProcessor if smol else transformers.Idefics3ImageProcessor
    image_processor = image_cls(do_image_splitting=False, size={"longest_edge": side},
                                max_image_size={"longest_edge": side})
    if smol:
        processor = transformers.SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                  video_processor=transformers.SmolVLMVideoProcessor(),
                                                  image_seq_len=image_tokens, chat_template=IDEFICS_TEMPLATE)
    else:
        processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                                   image_seq_len=image_tokens, chat_template=IDEFICS_TEMPLATE)
    return Built(model, processor)


# --- LLaVA ------------------------------------------------------------------------------------------
LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _llava(words: list[str], dims: Dims, image_tokens: int) -> Built:
    tokenizer = word_tokenizer(words, LLAVA_SPECIALS, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                               image_token="<image>")
    side = 8 * _side(image_tokens)  # CLIP patches of 8 px, the CLS feature dropped
    text = transformers.LlamaConfig(vocab_size=_vocab_size(tokenizer), hidden_size=dims.hidden,
                                    intermediate_size=dims.intermediate, num_hidden_layers=dims.layers,
                                    num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
                                    max_position_embeddings=512, **_special_ids(tokenizer))
    vision = transformers.CLIPVisionConfig(hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                                           num_hidden_layers=dims.vision_layers,
                                           num_attention_heads=dims.vision_heads, image_size=side, patch_size=8,
                                           projection_dim=dims.hidden)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                      image_seq_length=image_tokens, vision_feature_layer=-1,
                                      vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlavaForConditionalGeneration(config)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": side},
                                                      crop_size={"height": side, "width": side})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=LLAVA_TEMPLATE)
    return Built(model, processor)


# --- Gemma 3 -------------------------------------------------------------------------------------
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{% if message['role'] == 'assistant' %}model{% else %}{{ message['role'] }}{% endif %}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma3(words: list[str], dims: Dims, image_tokens: int) -> Built:
    tokenizer = word_tokenizer(words, GEMMA_SPECIALS, pad_token="<pad>", eos_token="<end_of_turn>", bos_token="<bos>",
                               boi_token="<start_of_image>", eoi_token="<end_of_image>",
                               image_token="<image_soft_token>")
    side = 32  # SigLIP patches of 8 px (a 4×4 grid), average-pooled down to `image_tokens`
    boi, eoi, image = _ids(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = transformers.Gemma3TextConfig(vocab_size=_vocab_size(tokenizer), hidden_size=dims.hidden,
                                         intermediate_size=dims.intermediate, num_hidden_layers=dims.layers,
                                         num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
                                         head_dim=dims.head_dim, query_pre_attn_scalar=dims.head_dim,
                                         sliding_window=64, max_position_embeddings=512, **_special_ids(tokenizer))
    vision = transformers.SiglipVisionConfig(hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                                             num_hidden_layers=dims.vision_layers,
                                             num_attention_heads=dims.vision_heads, image_size=side, patch_size=8,
                                             vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=image_tokens,
                                       boi_token_index=boi, eoi_token_index=eoi, image_token_index=image,
                                       **_special_ids(tokenizer))
    model = transformers.Gemma3ForConditionalGeneration(config)
    image_processor = transformers.Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False)
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             image_seq_length=image_tokens, chat_template=GEMMA_TEMPLATE)
    return Built(model, processor)


BUILDERS: dict[str, Callable[[list[str], Dims, int], Built]] = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "smolvlm": lambda words, dims, n: _idefics_like(words, dims, n, smol=True),
    "idefics3": lambda words, dims, n: _idefics_like(words, dims, n, smol=False),
    "llava": _llava,
    "gemma3": _gemma3,
}
