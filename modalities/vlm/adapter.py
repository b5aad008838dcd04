"""Vision-language models: AutoModelForImageTextToText + AutoProcessor, prompts through the processor's
chat template with one image placeholder per image, exact-match scoring of the answers.

Teacher and student may use different processors (resolution, image-token count, chat template): each
model encodes the prompt its own way, and the student's response tokens are appended to both.

Positions. Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) use multimodal rope: 3-D positions
(time, height, width) for image tokens, computed from the image grids by the model's `get_rope_index`.
This adapter computes them explicitly for the prompt (and for prompt + response when teacher-forcing)
and continues them one text position per sampled token, so cached sampling and a full forward agree.
Other families get 1-D positions that skip left padding, as the core's causal-model default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmopd.config import ConfigError
from mmopd.data.records import RecordError, image_parts
from mmopd.models import hf
from mmopd.models.adapter import ModalityAdapter, ModelLoadError, load_pretrained, register_adapter
from mmopd.models.compat import check_embedding_rows, check_same_vocab
from mmopd.models.hf import ModelCalls
from mmopd.step.batch import PromptBatch, TokenSpace
from modalities.vlm.images import check_image, load_rgb, picture_of

TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")  # extras with one entry per prompt token: [B, P]
PLACEHOLDER_ATTRS = ("image_token", "video_token", "boi_token", "eoi_token", "fake_image_token",
                     "global_image_token", "global_image_tag", "vision_bos_token", "vision_eos_token")
PLACEHOLDER_CONFIG_IDS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                          "vision_end_token_id", "boi_token_index", "eoi_token_index", "boi_token_id",
                          "eoi_token_id")
_ANSWER_MARK = "mmopdanswermark"


def normalize_answer(text: str) -> str:
    """Lower-cased with whitespace collapsed: what exact match compares."""
    return " ".join(text.lower().split())


def tokenizer_of(processor: Any) -> Any:
    return processor.tokenizer


def messages_of(record: dict) -> list[dict]:
    """The prompt's messages: a conversation as given (its image parts bound to `images` in order), or for a
    plain prompt one user turn of one image part per image, then the prompt text."""
    if isinstance(record["prompt"], list):
        return record["prompt"]
    content = [{"type": "image"} for _ in record["images"]] + [{"type": "text", "text": record["prompt"]}]
    return [{"role": "user", "content": content}]


def prompt_text(record: dict, processor: Any) -> str:
    return processor.apply_chat_template(messages_of(record), tokenize=False, add_generation_prompt=True)


def turn_end_id(processor: Any) -> int | None:
    """The special token the chat template puts right after an assistant's reply (`<|im_end|>`,
    `<end_of_turn>`, ...), or None when the template ends replies with plain text."""
    conversation = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": _ANSWER_MARK}]}]
    rendered = processor.apply_chat_template(conversation, tokenize=False)
    if _ANSWER_MARK not in rendered:
        return None
    tok = tokenizer_of(processor)
    after = tok(rendered.split(_ANSWER_MARK, 1)[1], add_special_tokens=False)["input_ids"]
    return after[0] if after and after[0] in tok.all_special_ids else None


def _rope_index_owner(model: nn.Module) -> nn.Module | None:
    """The submodule with `get_rope_index` for multimodal-rope models (Qwen-VL), else None."""
    base = hf.base_model(model)
    for candidate in (base, getattr(base, "model", None)):
        if candidate is not None and hasattr(candidate, "get_rope_index"):
            return candidate
    return None


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def lm_only(model: nn.Module) -> nn.Module:
    """`student.trainable: lm_only`: the vision tower and projector frozen, the language model trained."""
    language = [model.get_decoder(), model.get_output_embeddings()]
    if any(part is None for part in language):
        raise ConfigError(f"student.trainable=lm_only: {type(model).__name__} does not expose its language "
                          "model (get_decoder / get_output_embeddings); use full or lora")
    model.requires_grad_(False)
    for part in language:
        part.requires_grad_(True)
    return model


def _forward_inputs(model: nn.Module, input_ids: Tensor, mask: Tensor,
                    extras: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model inputs for a full sequence [B, L] with explicit positions ([3, B, L] for mrope, else [B, L])."""
    dtype = _float_dtype(model)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in extras.items()}
    owner = _rope_index_owner(model)
    if owner is None:
        positions = hf.positions(mask)
    else:
        if "mm_token_type_ids" not in inputs:
            raise ModelLoadError(f"{type(hf.base_model(model)).__name__} uses multimodal rope, but its processor "
                                 "returned no mm_token_type_ids; upgrade transformers or the processor files")
        rope_kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                       if k in inputs}
        positions, _ = owner.get_rope_index(input_ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            attention_mask=mask, **rope_kwargs)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **inputs}


class VLMCalls(ModelCalls):
    """The VLM's model calls: explicit positions (multimodal rope for Qwen-VL) on the prompt and the response."""

    def model_class(self, path: str) -> Any:
        return AutoModelForImageTextToText

    def start(self, model: nn.Module, prompts: PromptBatch) -> tuple[Tensor, Any]:
        inputs = _forward_inputs(model, prompts.input_ids, prompts.attention_mask, prompts.model_inputs)
        out = model(**inputs, use_cache=True, **hf.keep_last(model, 1))
        positions = inputs["position_ids"]  # [B, P] or [3, B, P]
        last = positions.amax(-1) if positions.dim() == 2 else positions.amax(-1).amax(0)  # [B]
        return out.logits[:, -1], (hf.cache_of(out), prompts.attention_mask, last, positions.dim() == 3)

    def step(self, model: nn.Module, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        cache, mask, last, mrope = state
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = last + 1  # [B]: a text token takes the next position on every rope axis
        position_ids = pos[None, :, None].expand(3, -1, 1) if mrope else pos[:, None]
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids, use_cache=True,
                    **hf.cache_arg(model, cache))
        return out.logits[:, -1], (hf.cache_of(out), mask, pos, mrope)

    def response_logits(self, model: nn.Module, prompts: PromptBatch, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        input_ids = torch.cat([prompts.input_ids, tokens], dim=1)  # [B, P+T]
        mask = torch.cat([prompts.attention_mask, torch.ones_like(tokens)], dim=1)
        extras = {k: torch.cat([v, v.new_zeros(v.shape[0], T)], dim=1) if k in TOKEN_ALIGNED else v
                  for k, v in prompts.model_inputs.items()}  # response tokens are text: type 0
        out = model(**_forward_inputs(model, input_ids, mask, extras), **hf.keep_last(model, T + 1))
        return out.logits[:, -(T + 1):-1]  # [B, T, V]


@register_adapter("vlm")
class VLMAdapter(ModalityAdapter):
    metric = "accuracy"
    scores_answers = True
    prompt_pictures = True  # vLLM takes them as multi_modal_data (a served rollout engine cannot send them)
    calls = VLMCalls()
    trainable_modes = {"lm_only": lm_only}

    # --- loading -------------------------------------------------------------------------------
    def load_processor(self, path: str, role: str) -> Any:
        processor = load_pretrained(AutoProcessor.from_pretrained, path, role)
        tok = getattr(processor, "tokenizer", None)
        if tok is None or not hasattr(processor, "image_processor"):
            raise ModelLoadError(f"{role}.path={path!r}: {type(processor).__name__} is not a vision-language "
                                 "processor (it needs a tokenizer and an image processor); use modality text "
                                 "for text-only models")
        if not processor.chat_template:
            raise ModelLoadError(f"{role}.path={path!r}: the processor has no chat_template, so the adapter cannot "
                                 "place the images in the prompt; use an instruct checkpoint or save one with "
                                 "processor.chat_template")
        if tok.eos_token_id is None and turn_end_id(processor) is None:
            raise ModelLoadError(f"{role} tokenizer at {path} has no eos_token; responses could never end")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return processor

    def check_pair(self, student_processor: Any, teacher_processor: Any, student: nn.Module,
                   teacher: nn.Module) -> None:
        s_tok, t_tok = tokenizer_of(student_processor), tokenizer_of(teacher_processor)
        check_same_vocab(s_tok, t_tok)
        check_embedding_rows(student, "student", len(s_tok))
        check_embedding_rows(teacher, "teacher", len(t_tok))

    def token_space(self, processor: Any, model: nn.Module) -> TokenSpace:
        """Every text token except image/video placeholders: a sampled placeholder would ask the model
        for image features that do not exist."""
        tok = tokenizer_of(processor)
        check_embedding_rows(model, "student", len(tok))
        excluded = self.placeholder_ids(processor, model)
        ids = torch.tensor([i for i in range(len(tok)) if i not in excluded])
        return TokenSpace(len(ids), ids)

    def placeholder_ids(self, processor: Any, model: nn.Module) -> set[int]:
        """Token ids that stand for image or video content (from the processor and the model config)."""
        tok = tokenizer_of(processor)
        found = set()
        for owner in (processor, tok):
            for attr in PLACEHOLDER_ATTRS:
                token = getattr(owner, attr, None)
                if isinstance(token, str) and token in tok.get_vocab():
                    found.add(tok.convert_tokens_to_ids(token))
        config = hf.base_model(model).config
        for attr in PLACEHOLDER_CONFIG_IDS:
            value = getattr(config, attr, None)
            if isinstance(value, int) and 0 <= value < len(tok):
                found.add(value)
        return found

    def eos_token_ids(self, processor: Any) -> list[int]:
        """The chat template's end-of-turn token first (what answers end with), then the tokenizer's EOS."""
        ids = [turn_end_id(processor), tokenizer_of(processor).eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # --- data --------------------------------------------------------------------------------
    def check_record(self, raw: dict, base_dir: Path) -> dict:
        """`{"prompt": str, "images": [...], "answer": str}`, or a conversation (`data.conversation` unpacked it
        into a `prompt` list of messages) whose {"type": "image"} parts take the `images` in order. An image is a
        path (relative to the data), a URL, picture bytes or a datasets Image; one Image may stand for a list."""
        prompt = raw.get("prompt")
        if isinstance(prompt, list):
            prompt = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]
                       if isinstance(m["content"], str) else m["content"]} for m in prompt]  # templates want parts
        elif not isinstance(prompt, str):
            raise RecordError("missing 'prompt' (a string, or 'messages')" if prompt is None else
                              f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        elif not prompt.strip():
            raise RecordError("'prompt' is empty")
        images = raw.get("images")
        if isinstance(images, (dict, bytes, Image.Image)):
            images = [images]  # one datasets Image column (e.g. data.fields.images=image)
        if not isinstance(images, list) or not images:
            raise RecordError("'images' must be a non-empty list of image paths (relative to the data file), URLs or "
                              "datasets Images; use modality text for text-only records")
        pictures = [picture_of(item, base_dir) for item in images]
        if isinstance(prompt, list) and image_parts(prompt) != len(pictures):
            raise RecordError(f"the messages hold {image_parts(prompt)} {{\"type\": \"image\"}} parts but the "
                              f"record has {len(pictures)} images; give one part per image, in order")
        for picture in pictures:
            check_image(picture)
        answer = raw.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise RecordError(f"'answer' must be a string, got {type(answer).__name__}")
        return {"prompt": prompt, "images": pictures, "answer": answer}

    def encode_prompts(self, records: list[dict], processor: Any) -> PromptBatch:
        texts = [prompt_text(r, processor) for r in records]
        images = [[load_rgb(p) for p in r["images"]] for r in records]
        bos = tokenizer_of(processor).bos_token
        special = not (bos is not None and texts[0].startswith(bos))  # the template already wrote BOS
        enc = processor(text=texts, images=images, padding=True, return_tensors="pt", add_special_tokens=special)
        extras = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and isinstance(v, Tensor)}
        # for engines that encode pictures themselves (vLLM's multi_modal_data): the pictures, and the prompt ids
        # with one placeholder a picture (the template's), which such an engine expands as the processor did
        engine_ids = tokenizer_of(processor)(texts, add_special_tokens=special)["input_ids"]
        state = {"images": images, "engine_ids": engine_ids}
        return PromptBatch(enc["input_ids"], enc["attention_mask"], extras, state)  # [B, P], [B, P]

    def measure_prompts(self, records: list[dict], processor: Any) -> list[int | str | None]:
        """Each prompt's length as the student reads it, its pictures expanded to their image tokens: encoded as a
        step encodes it (the processor alone knows a picture's token count), one record at a time, so a prompt
        longer than the context is refused before step 1 rather than trained past it."""
        return [int(self.encode_prompts([r], processor).attention_mask.sum()) for r in records]

    def encode_answers(self, records: list[dict], processor: Any) -> list[list[int]]:
        tok, end = tokenizer_of(processor), self.eos_token_ids(processor)[0]
        return [tok(r["answer"], add_special_tokens=False)["input_ids"] + [end] for r in records]

    def decode(self, tokens: Tensor, mask: Tensor, processor: Any) -> list[str]:
        tok, ends = tokenizer_of(processor), set(self.eos_token_ids(processor))
        out = []
        for row, keep in zip(tokens.tolist(), mask.bool().tolist()):
            ids = [t for t, k in zip(row, keep) if k and t not in ends]
            out.append(tok.decode(ids, skip_special_tokens=True).strip())
        return out

    def score(self, records: list[dict], responses: list[str]) -> dict[str, float]:
        """Accuracy over every record: one without an answer (refused when data.eval loads) counts as wrong."""
        hits = [r.get("answer") is not None and normalize_answer(resp) == normalize_answer(r["answer"])
                for r, resp in zip(records, responses)]
        return {"accuracy": sum(hits) / len(hits)}
