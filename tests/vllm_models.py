"""Tiny real-architecture checkpoints that vLLM's CPU backend loads, for tests of the vLLM engine.

vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ... only (not the toys' 16 or 24), so every
language model here has head_dim 32. Each builder writes a `save_pretrained` directory (model, tokenizer or
processor) that both HF (`from_pretrained`) and vLLM (`LLM(model=dir)`, the api_server) load by path, and
returns that path. The builders reuse the repo's toys (tokenizers, vocabularies, processors) and only change
the sizes:

    build_text(dir, "teacher")   Qwen3ForCausalLM over the addition toy's char tokenizer (max 64 positions)
    build_text_pair(dir)         teacher, student and 32/8 addition records, like `toy.build_untrained`
    build_image_tokens(dir)      LlamaGen-style class-conditional LlamaForCausalLM + LlamaGenTokenizer (VQ)
    build_llava(dir)             LlavaForConditionalGeneration (CLIP tower) over the shapes-VQA words

What vLLM needs beyond loading them (docs/vllm-cpu-facts.md has the evidence):
- The text models tie their embeddings, as the toys (and Qwen3-0.6B) do. vLLM's `reload_weights` does not
  refresh a tied LM head; a weight sync must start the engine from, and write, untied checkpoints.
- The LlamaGen generator has max_position_embeddings = 2 + grid² (18), as the toy's; scoring a whole picture
  with prompt_logprobs needs max_model_len 19 (prompt + picture + the one generated token), so pass
  `max_model_len=19` with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.
- vLLM expands LLaVA's `<image>` itself: send one `<image>` id per picture with `multi_modal_data`, not the HF
  processor's expanded ids (those are expanded again, silently).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from modalities.image_tokens.llamagen import SPECIALS as LLAMAGEN_SPECIALS
from modalities.image_tokens.llamagen import LlamaGenTokenizer, build_generator
from modalities.image_tokens.vq import VQConfig, VQModel
from modalities.text import toy
from modalities.vlm import shapes
from modalities.vlm.families import Dims, build_family_model, save_family_model

HEAD_DIM = 32  # the smallest head size vLLM's CPU attention supports

TEXT_SIZES: dict[str, dict[str, int]] = {
    "teacher": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 256},
    "student": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                "intermediate_size": 128},
}
IMAGE_TOKEN_SIZE = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128}
IMAGE_TOKEN_CLASSES = ("circle", "square", "triangle")
LLAVA_DIMS = Dims(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, vision_hidden=64, vision_layers=1,
                  vision_heads=2)
LLAVA_IMAGE_TOKENS = 4


def build_text(out_dir: str | Path, size: str = "teacher", seed: int = 0) -> Path:
    """A random Qwen3 causal LM of TEXT_SIZES[size] (head_dim 32) with the addition toy's tokenizer."""
    if size not in TEXT_SIZES:
        raise ValueError(f"size must be one of {sorted(TEXT_SIZES)}, got {size!r}")
    dims = TEXT_SIZES[size]
    if dims["hidden_size"] != HEAD_DIM * dims["num_attention_heads"]:
        raise ValueError(f"{size}: hidden_size must be {HEAD_DIM} × num_attention_heads for vLLM's CPU attention")
    torch.manual_seed(seed)
    tokenizer = toy.build_tokenizer()
    config = transformers.Qwen3Config(
        vocab_size=8 * math.ceil(len(tokenizer) / 8), head_dim=HEAD_DIM, max_position_embeddings=toy.MAX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": toy.ROPE_THETA}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **dims,
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_text_pair(out_dir: str | Path) -> dict[str, Path]:
    """Random teacher and student (head_dim 32 both) and 32 train / 8 eval addition records under out_dir."""
    out = Path(out_dir)
    paths = {role: build_text(out / role, role, seed=i) for i, role in enumerate(("teacher", "student"))}
    for split, n, seed in (("train", 32, 1), ("eval", 8, 2)):
        paths[split] = out / "data" / f"{split}.jsonl"
        toy.write_jsonl(paths[split], toy.make_records(n, seed=seed))
    return paths


def _visual_vocab_tokenizer(image_tokenizer: LlamaGenTokenizer) -> transformers.PreTrainedTokenizerFast:
    """An HF tokenizer whose ids are the LlamaGen layout's (codes, specials, classes), so that vLLM, which wants a
    tokenizer beside the weights, loads the generator; mmopd itself reads `image_tokenizer.json`."""
    names = [f"<code_{i}>" for i in range(image_tokenizer.codebook_size)]
    names += [f"<{s}>" for s in LLAMAGEN_SPECIALS]
    names += [f"<class_{i}>" for i in range(len(image_tokenizer.class_names))]
    backend = Tokenizer(models.WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<boi>",
                                                unk_token="<pad>")


def build_image_tokens(out_dir: str | Path, class_names: tuple[str, ...] = IMAGE_TOKEN_CLASSES,
                       seed: int = 0) -> Path:
    """A random class-conditional LlamaGen-style generator (head_dim 32) with its LlamaGenTokenizer (a random VQ,
    the toy's default 4×4 grid over 64 codes) and an HF tokenizer over the same ids."""
    torch.manual_seed(seed)
    image_tokenizer = LlamaGenTokenizer(VQModel(VQConfig()), list(class_names))
    model = build_generator(image_tokenizer, **IMAGE_TOKEN_SIZE).eval()
    assert model.config.head_dim == HEAD_DIM, model.config.head_dim
    out = Path(out_dir)
    model.save_pretrained(out)
    image_tokenizer.save_pretrained(out)
    _visual_vocab_tokenizer(image_tokenizer).save_pretrained(out)
    return out


def to_hub_llava_layout(path: str | Path) -> None:
    """Rename a saved LLaVA's vision-tower keys to the hub's llava-hf layout, `vision_tower.vision_model.*`,
    which vLLM's loader expects (transformers saves `vision_tower.embeddings.*` and reads both)."""
    file = Path(path) / "model.safetensors"
    weights = load_file(file)
    prefix = "vision_tower."
    renamed = {(prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix)
                and not k.startswith(prefix + "vision_model.") else k): v for k, v in weights.items()}
    save_file(renamed, file, metadata={"format": "pt"})


def build_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny LLaVA (CLIP tower, head_dim 32 everywhere, 4 image tokens a picture) with the VLM toy's
    processor and chat template, saved in the hub's key layout."""
    built = build_family_model("llava", shapes.WORDS, LLAVA_DIMS, image_tokens=LLAVA_IMAGE_TOKENS, seed=seed)
    out = save_family_model(built, out_dir)
    to_hub_llava_layout(out)
    return out


def config_and_tokenizer(model_dir: str | Path, out: str | Path) -> Path:
    """A copy of a model directory without its weights: what a trainer reads of a teacher that vLLM holds."""
    out = Path(out)
    out.mkdir(parents=True)
    for file in Path(model_dir).iterdir():
        if file.is_file() and not file.name.endswith(".safetensors"):
            shutil.copy(file, out / file.name)
    return out
