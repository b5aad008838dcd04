"""Emu3 (transformers' `Emu3ForConditionalGeneration`) in text-to-image mode.

How Emu3 writes a picture of h×w codes:
- the prompt is BOS + text + `<|image start|>{h}*{w}<|image token|>` (the processor's
  `return_for_image_generation=True`);
- the response is h rows of (w visual tokens, then the end-of-line `<|extra_200|>`), then the
  end-of-frame `<|extra_201|>`, `<|image end|>` and EOS: h·(w+1) + 3 tokens;
- visual tokens (`<|visual token000123|>`) are ordinary vocabulary entries scored by `lm_head`;
  `vocabulary_map` maps them to VQ codes.

Structure. As transformers' docs do with `prefix_allowed_tokens_fn`, each response position allows
only its tokens: the fixed structural token where one belongs, any visual token elsewhere. The adapter
sets every other logit to MASKED, a large finite negative, in both models: at structural positions both
distributions are one-hot, so they add exactly zero divergence, and sampling can never break a row.

CFG: the unconditional prompt is the same image prefix after an empty text.
Resolution: the processor's `ratio` and `image_area` (Emu3's defaults, 1:1 and 720×720 → 90×90 codes);
`image_tokens.json` beside the checkpoint (`{"ratio": "1:1", "image_area": 1024}`) overrides them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import (AutoConfig, AutoProcessor, Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor,
                          Emu3Processor, Emu3TextConfig, Emu3VQVAE, Emu3VQVAEConfig, PreTrainedTokenizerFast)

from modalities.image_tokens.vq_weights import load_vq_weights

RESOLUTION_FILE = "image_tokens.json"
EOL, EOF = "<|extra_200|>", "<|extra_201|>"
MASKED = -1.0e4  # exp(MASKED - max) is 0 in float32, and MASKED stays finite in every dtype: no 0·inf NaNs


def visual_token(code: int) -> str:
    return f"<|visual token{code:06d}|>"


class Emu3ImageTokenizer:
    """Text prompts -> Emu3 image-generation prompts; the response layout; tokens -> pictures."""

    family = "emu3"

    def __init__(self, processor: Emu3Processor, vq: Emu3VQVAE, vocabulary_map: dict[str, int], ratio: str,
                 image_area: int):
        self.processor, self.tokenizer, self.vq = processor, processor.tokenizer, vq
        self.ratio, self.image_area = ratio, image_area
        self.cfg_scale = 1.0
        self.class_names = None  # prompts are free text
        self.codebook_size = vq.config.codebook_size
        missing = [c for c in range(self.codebook_size) if visual_token(c) not in vocabulary_map]
        if missing:
            raise ValueError(f"vocabulary_map has no {visual_token(missing[0])} ({len(missing)} codes missing); the "
                             "language model cannot emit every code of its VQ")
        self.visual_ids = torch.tensor([vocabulary_map[visual_token(c)] for c in range(self.codebook_size)])  # [K]
        self.code_of = {token_id: code for code, token_id in enumerate(self.visual_ids.tolist())}
        tok = self.tokenizer
        self.eol_id, self.eof_id = vocabulary_map[EOL], vocabulary_map[EOF]
        self.eoi_id = tok.convert_tokens_to_ids(tok.eoi_token)
        self.eos_id, self.pad_token_id = tok.eos_token_id, tok.pad_token_id
        self.height, self.width = processor.calculate_generate_size(ratio, image_area, processor.downsample_ratio)
        h, w = self.height, self.width
        self.num_image_tokens = h * (w + 1) + 3
        self.layout = f"{h} rows of {w} codes and an end-of-line, then 3 end tokens"
        forced = torch.full((self.num_image_tokens,), -1, dtype=torch.long)  # -1: any visual token
        forced[torch.arange(1, h + 1) * (w + 1) - 1] = self.eol_id
        forced[h * (w + 1):] = torch.tensor([self.eof_id, self.eoi_id, self.eos_id])
        self.forced = forced  # [T]
        self.space_ids = torch.cat([self.visual_ids, torch.tensor([self.eol_id, self.eof_id, self.eoi_id, self.eos_id])])

    @classmethod
    def from_pretrained(cls, path: str) -> "Emu3ImageTokenizer":
        processor = AutoProcessor.from_pretrained(path)
        if not isinstance(processor, Emu3Processor):
            raise ValueError(f"{path}: expected an Emu3Processor, found {type(processor).__name__}")
        config = AutoConfig.from_pretrained(path)
        resolution = {"ratio": processor.ratio, "image_area": processor.image_area}
        local = Path(path) / RESOLUTION_FILE
        if local.is_file():
            resolution.update(json.loads(local.read_text()))
        vq = load_vq_weights(path, Emu3VQVAE(config.vq_config))
        return cls(processor, vq, config.vocabulary_map, resolution["ratio"], resolution["image_area"])

    def save_pretrained(self, path: str | Path) -> None:
        self.processor.save_pretrained(path)  # the VQ is part of the model's own weights
        (Path(path) / RESOLUTION_FILE).write_text(json.dumps({"ratio": self.ratio, "image_area": self.image_area}))

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded generation prompts and their attention mask, [B, P] each."""
        enc = self.processor(text=prompts, return_for_image_generation=True, ratio=self.ratio,
                             image_area=self.image_area, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def unconditional(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The image prefix after an empty text, left-padded to the conditional prompts' length. [B, P] each"""
        ids, uncond_mask = self.encode_prompts([""] * input_ids.shape[0])
        pad = input_ids.shape[1] - ids.shape[1]
        return (torch.cat([ids.new_full((ids.shape[0], pad), self.pad_token_id), ids], dim=1),
                torch.cat([uncond_mask.new_zeros(ids.shape[0], pad), uncond_mask], dim=1))

    def structure(self) -> dict[str, Tensor]:
        """What the model calls need to keep the layout: the forced id per position and the visual ids."""
        return {"forced": self.forced, "visual_ids": self.visual_ids}

    def codebook(self) -> Tensor:
        """[K, D] code vectors."""
        return self.vq.quantize.embedding.weight.detach()

    def decode_images(self, tokens: Tensor) -> list[Image.Image]:
        """[B, h·(w+1)+3] responses -> PIL pictures (the rows' visual tokens, end-of-lines dropped)."""
        h, w = self.height, self.width
        lines = rearrange(tokens[:, : h * (w + 1)], "b (h row) -> b h row", h=h)  # [B, h, w+1]: w ids, end-of-line
        rows = lines[..., :w].cpu()  # [B, h, w] token ids
        codes = torch.tensor([self.code_of[t] for t in rows.flatten().tolist()]).view_as(rows)
        with torch.no_grad():
            pixels = self.vq.decode(codes.to(self.vq.device))  # [B, 3, H, W]
        return self.processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]


def constrain(logits: Tensor, forced: Tensor, visual_ids: Tensor) -> Tensor:
    """Keep each position's allowed tokens: its forced id, or (where forced is -1) the visual tokens.
    logits [B, T, V] with forced [T]; every other logit becomes MASKED."""
    visual = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    visual[visual_ids.to(logits.device)] = True
    out = logits.masked_fill(~visual, MASKED)
    rows = (forced >= 0).nonzero().flatten().to(logits.device)  # [R] structural positions
    if rows.numel():
        ids = forced.to(logits.device)[rows]  # [R]
        kept = logits[:, rows, ids]  # [B, R]
        out[:, rows] = MASKED
        out[:, rows, ids] = kept
    return out


# --- tiny models for tests -------------------------------------------------------------------------

def tiny_tokenizer(words: list[str], codebook_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Emu3's special and visual tokens; digits and `*` split (for `4*4`)."""
    specials = ["<|endoftext|>", "<|extra_204|>", "<|extra_203|>", "<unk>", "<image>", "<|image start|>",
                "<|image end|>", "<|image token|>", EOF, EOL]
    visual = [visual_token(c) for c in range(codebook_size)]
    vocab = {t: i for i, t in enumerate(specials + visual + sorted(set(words) | set("0123456789*")))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex(r"[0-9*]"), behavior="isolated")])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=specials[0], eos_token=specials[1], bos_token=specials[2],
        unk_token=specials[3], padding_side="left", additional_special_tokens=visual + [EOL],
        extra_special_tokens={"image_token": specials[4], "boi_token": specials[5], "eoi_token": specials[6],
                              "image_wrapper_token": specials[7], "eof_token": EOF})


def build_tiny(words: list[str], hidden: int = 32, layers: int = 2, codebook_size: int = 32, grid: int = 4,
               seed: int = 0) -> tuple[Emu3ForConditionalGeneration, Emu3ImageTokenizer]:
    """A random Emu3 of the real classes at a tiny size: grid×grid codes, decoded to 2·grid pixels a side."""
    tokenizer = tiny_tokenizer(words, codebook_size)
    vocab = tokenizer.get_vocab()
    vq = Emu3VQVAEConfig(codebook_size=codebook_size, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[],
                         temporal_downsample_factor=1, hidden_size=64, num_attention_heads=1)
    text = Emu3TextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(vq_config=vq, text_config=text, vocabulary_map=vocab)).eval()
    image_processor = Emu3ImageProcessor(min_pixels=8 * 8, max_pixels=64 * 64, spatial_factor=2)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)
    side = grid * processor.downsample_ratio  # Emu3 counts the area in pixels at 8 per code
    return model, Emu3ImageTokenizer(processor, model.model.vqmodel, vocab, "1:1", side * side)
