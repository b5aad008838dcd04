"""The built-in LlamaGen-style family: a class-conditional transformers `LlamaForCausalLM` over a visual
vocabulary, and its processor (`LlamaGenTokenizer`), which owns the VQ and the vocabulary layout.

Vocabulary layout. Code indices come first, so a token id *is* a code index in every model that shares
the codebook, however many classes or special tokens it has:

    [0, K)      the K visual codes
    K           pad
    K + 1       boi (begin of image)
    K + 2       the null class: the unconditional prompt of classifier-free guidance
    K + 3 + c   class c

A prompt is `[class, boi]` (unconditional: `[null, boi]`); the picture follows as grid² codes, row-major.
The processor is saved beside the model: `image_tokenizer.json` (class names, layout) and `vq/` (the VQ).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modalities.image_tokens.shapes import to_images
from modalities.image_tokens.vq import VQModel

TOKENIZER_FILE = "image_tokenizer.json"
VQ_DIR = "vq"
SPECIALS = ("pad", "boi", "null")


def normalize_prompt(text: str) -> str:
    return " ".join(text.lower().split())


class LlamaGenTokenizer:
    """Class names <-> prompt ids, pictures <-> codes. `cfg_scale` is set on a teacher's processor by the
    adapter; prompts it encodes then carry the unconditional branch."""

    family = "llamagen"

    def __init__(self, vq: VQModel, class_names: list[str]):
        if not class_names:
            raise ValueError("a class-conditional tokenizer needs at least one class name")
        if len({normalize_prompt(n) for n in class_names}) != len(class_names):
            raise ValueError(f"class names must be distinct (ignoring case and spacing): {class_names}")
        self.vq = vq.eval().requires_grad_(False)
        self.class_names = list(class_names)
        self.cfg_scale = 1.0
        K = vq.config.codebook_size
        self.codebook_size = K
        self.pad_token_id, self.boi_token_id, self.null_class_id = K, K + 1, K + 2
        self.class_offset = K + len(SPECIALS)
        self.vocab_size = self.class_offset + len(class_names)
        self.grid = vq.config.grid
        self.num_image_tokens = self.grid ** 2
        self.layout = f"{self.grid}×{self.grid} codes"
        self.image_size = vq.config.image_size
        self._labels = {normalize_prompt(n): i for i, n in enumerate(class_names)}

    def label_of(self, prompt: str) -> int | None:
        """The class a prompt names (case and spacing ignored), or None."""
        return self._labels.get(normalize_prompt(prompt))

    def prompt_ids(self, labels: list[int]) -> Tensor:
        """[B] class labels -> [B, 2] prompt ids `[class, boi]`."""
        classes = torch.tensor(labels, dtype=torch.long) + self.class_offset
        return torch.stack([classes, torch.full_like(classes, self.boi_token_id)], dim=1)

    def unconditional_ids(self, n: int) -> Tensor:
        """[n, 2] prompt ids `[null, boi]`."""
        return torch.tensor([[self.null_class_id, self.boi_token_id]] * n, dtype=torch.long)

    def codebook(self) -> Tensor:
        """[K, D] code vectors: two models can score each other's pictures only if these match."""
        return self.vq.codebook.weight.detach()

    def encode_images(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, grid²] token ids."""
        return self.vq.encode(pixels.to(self.vq.device))

    def decode_images(self, tokens: Tensor) -> list[Image.Image]:
        """[B, grid²] token ids -> PIL pictures."""
        return to_images(self.vq.decode(tokens.to(self.vq.device)))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vq.save_pretrained(path / VQ_DIR)
        layout = {"family": self.family, "class_names": self.class_names, "codebook_size": self.codebook_size,
                  "grid": self.grid, "specials": {name: self.codebook_size + i for i, name in enumerate(SPECIALS)},
                  "class_offset": self.class_offset, "vq": VQ_DIR}
        (path / TOKENIZER_FILE).write_text(json.dumps(layout, indent=2) + "\n")
        self.hf_tokenizer().save_pretrained(path)  # inference engines (vLLM) want a tokenizer beside the weights

    def hf_tokenizer(self) -> PreTrainedTokenizerFast:
        """A transformers tokenizer over this layout's ids (codes, specials, classes, one name each), for tools
        that load a tokenizer with the model; mmopd itself reads `image_tokenizer.json`."""
        names = [f"<code_{i}>" for i in range(self.codebook_size)] + [f"<{s}>" for s in SPECIALS]
        names += [f"<class_{i}>" for i in range(len(self.class_names))]
        backend = Tokenizer(models.WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<boi>",
                                       unk_token="<pad>")

    @staticmethod
    def class_names_at(path: str | Path) -> list[str]:
        """The class names saved at `path`, read without loading the VQ."""
        return json.loads((Path(path) / TOKENIZER_FILE).read_text())["class_names"]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlamaGenTokenizer":
        path = Path(path)
        layout = json.loads((path / TOKENIZER_FILE).read_text())
        tokenizer = cls(VQModel.from_pretrained(path / layout["vq"]), layout["class_names"])
        if (tokenizer.codebook_size, tokenizer.class_offset) != (layout["codebook_size"], layout["class_offset"]):
            raise ValueError(f"{path / TOKENIZER_FILE} describes {layout['codebook_size']} codes from id 0 and classes "
                             f"from id {layout['class_offset']}, but its VQ has {tokenizer.codebook_size} codes; "
                             "the VQ and the tokenizer file do not belong together")
        return tokenizer


def build_generator(tokenizer: LlamaGenTokenizer, hidden: int, layers: int, heads: int,
                    intermediate: int) -> LlamaForCausalLM:
    """A randomly initialised Llama over the tokenizer's vocabulary, with room for prompt + picture."""
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=2 + tokenizer.num_image_tokens, tie_word_embeddings=False,
        bos_token_id=tokenizer.boi_token_id, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,  # fixed length: no EOS
    )
    return LlamaForCausalLM(config)
