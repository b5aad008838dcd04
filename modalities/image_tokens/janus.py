"""Janus / Janus-Pro (transformers' `JanusForConditionalGeneration`) in text-to-image mode.

How Janus makes a picture (and how `generate(..., generation_mode="image")` does it):
- the prompt is the chat-templated text followed by `<begin_of_image>`;
- codebook logits come from `model.model.generation_head` on the language model's hidden states,
  not from `lm_head`;
- a sampled code is fed back through `model.prepare_embeddings_for_image_generation`;
- classifier-free guidance runs an unconditional copy of the prompt in which every token other than
  BOS and `<begin_of_image>` is replaced by PAD.

The processor (`JanusImageTokenizer`) wraps the `JanusProcessor` and loads the model's VQ (only its
weights, read from the checkpoint's safetensors) so that responses decode to pictures without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (AutoConfig, AutoProcessor, GenerationConfig, JanusConfig, JanusForConditionalGeneration,
                          JanusImageProcessor, JanusProcessor, JanusVisionConfig, JanusVQVAE, JanusVQVAEConfig,
                          LlamaConfig, PreTrainedTokenizerFast)

from mmopd.models import hf
from modalities.image_tokens.shapes import to_images
from modalities.image_tokens.vq_weights import load_vq_weights

CHAT_TEMPLATE = ("{% for message in messages %}<|User|>: {{ message['content'][0]['text'] }}\n\n{% endfor %}"
                 "{% if add_generation_prompt %}<|Assistant|>:{% endif %}")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under peft wrappers. A DDP-wrapped Janus is refused: its image-mode forward
    calls submodules directly, which would bypass DDP's gradient synchronisation."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise NotImplementedError("Janus students cannot be trained under DDP yet (the image-generation forward "
                                  "bypasses the DDP wrapper); train on one process")
    return hf.base_model(model)


class JanusImageTokenizer:
    """Text prompts -> Janus prompt ids (and their unconditional twins); codes -> pictures."""

    family = "janus"

    def __init__(self, processor: JanusProcessor, vq: JanusVQVAE, num_image_tokens: int):
        grid = vq.config.num_patches
        if num_image_tokens != grid ** 2:
            raise ValueError(f"vision_config.num_image_tokens={num_image_tokens} but the VQ decodes a {grid}×{grid} "
                             f"grid; set num_image_tokens={grid ** 2} (image_size // patch_size squared)")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vq = vq
        self.cfg_scale = 1.0
        self.codebook_size = vq.config.num_embeddings
        self.grid = grid
        self.layout = f"{grid}×{grid} codes"
        self.num_image_tokens = num_image_tokens
        self.image_size = grid * 2 ** (len(vq.config.channel_multiplier) - 1)  # the VQ's picture side
        self.pad_token_id = self.tokenizer.pad_token_id
        self.boi_token_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)
        self.class_names = None  # prompts are free text

    @classmethod
    def from_pretrained(cls, path: str) -> "JanusImageTokenizer":
        processor = AutoProcessor.from_pretrained(path)
        if not isinstance(processor, JanusProcessor):
            raise ValueError(f"{path}: expected a JanusProcessor, found {type(processor).__name__}")
        if processor.tokenizer.pad_token_id is None or processor.tokenizer.bos_token_id is None:
            raise ValueError(f"{path}: the Janus tokenizer needs a pad and a bos token (the unconditional prompt "
                             "is made of them)")
        config = AutoConfig.from_pretrained(path)
        vq = load_vq_weights(path, JanusVQVAE(config.vq_config))
        return cls(processor, vq, config.vision_config.num_image_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        self.processor.save_pretrained(path)  # the VQ is part of the model's own weights

    def prompt_text(self, prompt: str) -> str:
        if self.processor.chat_template:
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return prompt

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids ending in `<begin_of_image>` and their attention mask, [B, P] each."""
        enc = self.processor(text=[self.prompt_text(p) for p in prompts], generation_mode="image", padding=True,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def unconditional(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Every prompt token but BOS and `<begin_of_image>` replaced by PAD, as Janus's generate does; the
        same mask. [B, P] each"""
        keep = (input_ids == self.tokenizer.bos_token_id) | (input_ids == self.boi_token_id)
        return input_ids.masked_fill(~keep, self.pad_token_id), mask.clone()

    def codebook(self) -> Tensor:
        """[K, D] code vectors."""
        return self.vq.quantize.embedding.weight.detach()

    def encode_images(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] in [-1, 1] at the VQ's resolution -> [B, grid²] codes."""
        with torch.no_grad():
            return self.vq.encode(pixels.to(self.vq.dtype)).image_tokens.view(pixels.shape[0], -1)

    def decode_images(self, tokens: Tensor) -> list[Image.Image]:
        """[B, grid²] codes -> PIL pictures."""
        with torch.no_grad():
            return to_images(self.vq.decode(tokens))


# --- model calls: codebook logits [B, K] from the generation head ---------------------------------

def start(model: nn.Module, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Any]:
    """Prefill the prompt [B, P]; return the first code's logits [B, K] and the decoding state."""
    janus = unwrap(model)
    positions = hf.positions(mask)
    out = janus.model.language_model(inputs_embeds=janus.get_input_embeddings()(input_ids), attention_mask=mask,
                                     position_ids=positions, use_cache=True)
    return janus.model.generation_head(out.last_hidden_state[:, -1]), (hf.cache_of(out), mask, positions[:, -1])


def step(model: nn.Module, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
    """Feed one code per row [B]; return the next code's logits [B, K]."""
    janus = unwrap(model)
    cache, mask, last = state
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    pos = last + 1
    lm = janus.model.language_model
    out = lm(inputs_embeds=janus.prepare_embeddings_for_image_generation(tokens[:, None]), attention_mask=mask,
             position_ids=pos[:, None], use_cache=True, **hf.cache_arg(lm, cache))
    return janus.model.generation_head(out.last_hidden_state[:, -1]), (hf.cache_of(out), mask, pos)


def response_logits(model: nn.Module, input_ids: Tensor, mask: Tensor, tokens: Tensor) -> Tensor:
    """Teacher forcing: prompt text embeddings, then the embeddings of codes 0..T-2; row t scores code t.
    [B, P], [B, P], [B, T] -> [B, T, K]"""
    janus = unwrap(model)
    P, T = input_ids.shape[1], tokens.shape[1]
    embeds = torch.cat([janus.get_input_embeddings()(input_ids),
                        janus.prepare_embeddings_for_image_generation(tokens[:, :-1])], dim=1)  # [B, P+T-1, H]
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], T - 1)], dim=1)
    out = janus.model.language_model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=hf.positions(full_mask))
    return janus.model.generation_head(out.last_hidden_state[:, P - 1:])  # [B, T, K]


# --- tiny models for tests and the recipe check ------------------------------------------------------

def tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Janus's special tokens; BOS is prepended, padding on the left."""
    specials = ["<pad>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<unk>", "<image_placeholder>",
                "<begin_of_image>", "<end_of_image>", "<|User|>:", "<|Assistant|>:"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single=f"{specials[1]} $A",
                                                           special_tokens=[(specials[1], 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=specials[0], bos_token=specials[1], eos_token=specials[2],
        unk_token=specials[3], padding_side="left",
        extra_special_tokens={"image_token": specials[4], "boi_token": specials[5], "eoi_token": specials[6]})


def build_tiny(words: list[str], hidden: int = 32, layers: int = 2, codebook_size: int = 32, image_size: int = 32,
               patch_size: int = 8, seed: int = 0) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A random Janus with the real classes at a tiny size: a 4×4 code grid decoded to 8×8 pictures."""
    tokenizer = tiny_tokenizer(words)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    grid = image_size // patch_size
    vision = JanusVisionConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                               patch_size=patch_size, projection_dim=hidden, num_image_tokens=grid ** 2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=codebook_size, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 2], num_res_blocks=1, projection_dim=hidden,
                          image_token_embed_dim=hidden)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token))
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(  # what Janus's generate reads in image mode
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(tokenizer.boi_token)})
    image_processor = JanusImageProcessor(size={"height": image_size, "width": image_size})
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                               num_image_tokens=grid ** 2)
    return model, processor
