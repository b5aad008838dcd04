"""Autoregressive image generators over discrete visual tokens: the built-in class-conditional LlamaGen-style
family (`llamagen.py`), and Janus / Janus-Pro (`janus.py`) and Emu3 (`emu3.py`) through transformers.

The policy's action space is the visual codebook (plus, for Emu3, its four structural tokens): for
llamagen and Janus token id k is code k, so the TokenSpace is [0, K); Emu3's visual tokens live inside its
text vocabulary and the TokenSpace lists their ids. Divergences are renormalised over that space,
whatever else the vocabularies hold. Every picture has a fixed token count (llamagen, Janus: grid²;
Emu3: h·(w+1)+3), which `rollout.max_new_tokens` must equal.

Classifier-free guidance. A teacher loaded with `teacher.cfg_scale: s != 1` encodes each prompt with
its unconditional twin (llamagen: the null class; Janus: the PAD-filled prompt; Emu3: an empty text) in
`PromptBatch.state`. Every model call then runs both branches as one batch of 2B rows and returns
uncond + s·(cond − uncond).

Evaluation samples (the rollout's temperature, top-k and top-p) from a fixed seed and scores the pictures
with a judge (`data.judge`, a timm classifier): accuracy on the asked class and a toy FID.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, Emu3ForConditionalGeneration, JanusForConditionalGeneration

from mmopd.config import ConfigError
from mmopd.data.records import RecordError
from mmopd.engines.vllm.families import register_unsupported
from mmopd.models import hf
from mmopd.models.adapter import ModalityAdapter, ModelLoadError, RunSettings, load_pretrained, register_adapter
from mmopd.models.compat import IncompatibleModelsError, check_embedding_rows
from mmopd.models.hf import ModelCalls
from mmopd.step.batch import PromptBatch, Sampling, TokenSpace
from modalities.image_tokens import emu3, janus
from modalities.image_tokens.guidance import guide, with_unconditional
from modalities.image_tokens.judge import Judge
from modalities.image_tokens.llamagen import TOKENIZER_FILE, LlamaGenTokenizer, normalize_prompt
from modalities.image_tokens.shapes import to_tensor

FAMILIES = ("llamagen", "janus", "emu3")
TRANSFORMERS_FAMILIES = {"janus": (janus.JanusImageTokenizer, JanusForConditionalGeneration),
                         "emu3": (emu3.Emu3ImageTokenizer, Emu3ForConditionalGeneration)}
UNSUPPORTED = {
    "chameleon": "transformers' Chameleon cannot generate pictures (its forward masks every image-token logit and "
                 "its VQ has no decoder)",
}


def family_of(path: str) -> str:
    """`llamagen` for a directory with an image_tokenizer.json, else the checkpoint's model type (janus, emu3)."""
    if (Path(path) / TOKENIZER_FILE).is_file():
        return "llamagen"
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path!r} is neither a built-in generator (no {TOKENIZER_FILE}) nor a loadable "
                             f"transformers checkpoint: {err}") from err
    if model_type in TRANSFORMERS_FAMILIES:
        return model_type
    why = UNSUPPORTED.get(model_type, "it is not an image-token generator")
    raise ModelLoadError(f"{path!r} is a {model_type!r} model, which the image_tokens modality cannot drive: {why}. "
                         f"Supported families: {', '.join(FAMILIES)}")


def _label_lookup(class_names: list[str]) -> dict[str, int]:
    return {normalize_prompt(name): i for i, name in enumerate(class_names)}


def _is_janus(model: nn.Module) -> bool:
    return isinstance(hf.base_model(model), JanusForConditionalGeneration)


def _scale(prompts: PromptBatch) -> float:
    return prompts.state.get("cfg_scale", 1.0)


def _shape(logits: Tensor, scale: float, structure: dict[str, Tensor] | None, first: int) -> Tensor:
    """Guide, then (Emu3) keep the allowed tokens of response positions first, first+1, ... [B', T, V] -> [B, T, V]"""
    logits = guide(logits, scale)
    if structure is None:
        return logits
    forced = structure["forced"][first:first + logits.shape[1]]
    return emu3.constrain(logits, forced, structure["visual_ids"])


def _structure(prompts: PromptBatch) -> dict[str, Tensor] | None:
    return {k: prompts.state[k] for k in ("forced", "visual_ids")} if "forced" in prompts.state else None


def _both_branches(prompts: PromptBatch) -> tuple[Tensor, Tensor]:
    """Prompt ids and mask with the unconditional rows appended when guiding. [B, P] -> [B or 2B, P]"""
    if _scale(prompts) == 1.0:
        return prompts.input_ids, prompts.attention_mask
    return (torch.cat([prompts.input_ids, prompts.state["uncond_ids"]]),
            torch.cat([prompts.attention_mask, prompts.state["uncond_mask"]]))


@register_unsupported("JanusForConditionalGeneration")
def _janus_unsupported(model: nn.Module, served: bool) -> str:
    return "vLLM serves Janus as a text model; its image head and visual embeddings are not in vLLM"


@register_unsupported("Emu3ForConditionalGeneration")
def _layout_unsupported(model: nn.Module, served: bool) -> str:
    return f"{type(hf.base_model(model)).__name__} image generation (its constrained layout) is not in vLLM"


class ImageCalls(ModelCalls):
    """The generators' model calls: every call runs the (cond, uncond) rows as one batch when guiding, then
    `_shape` guides and, for Emu3, keeps each response position's allowed tokens. The state carries the next
    position. Janus runs through its own image head (`janus.py`)."""

    def model_class(self, path: str) -> Any:
        family = family_of(path)
        return AutoModelForCausalLM if family == "llamagen" else TRANSFORMERS_FAMILIES[family][1]

    def start(self, model: nn.Module, prompts: PromptBatch) -> tuple[Tensor, Any]:
        ids, mask = _both_branches(prompts)
        if _is_janus(model):
            logits, inner = janus.start(model, ids, mask)
        else:
            logits, inner = super().start(model, PromptBatch(ids, mask))
        scale, structure = _scale(prompts), _structure(prompts)
        return _shape(logits[:, None], scale, structure, 0)[:, 0], (inner, scale, structure, 1)

    def step(self, model: nn.Module, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        inner, scale, structure, position = state
        tokens = with_unconditional(tokens, scale)
        if _is_janus(model):
            logits, inner = janus.step(model, tokens, inner)
        else:
            logits, inner = super().step(model, tokens, inner)
        return _shape(logits[:, None], scale, structure, position)[:, 0], (inner, scale, structure, position + 1)

    def response_logits(self, model: nn.Module, prompts: PromptBatch, tokens: Tensor) -> Tensor:
        """[B, T] -> [B, T, V] (llamagen, Emu3: the whole vocabulary; Janus: the K codes)."""
        ids, mask = _both_branches(prompts)
        both = with_unconditional(tokens, _scale(prompts))
        if _is_janus(model):
            logits = janus.response_logits(model, ids, mask, both)
        else:
            logits = super().response_logits(model, PromptBatch(ids, mask), both)
        return _shape(logits, _scale(prompts), _structure(prompts), 0)


@register_adapter("image_tokens")
class ImageTokensAdapter(ModalityAdapter):
    metric = "classifier_accuracy"
    supports_cfg = True
    judges = True  # `score` judges each picture with the classifier at data.judge: objective.reward=judge
    calls = ImageCalls()
    # a prompt here is the class or caption to draw, not context for an answer: a teacher conditioned on another
    # one scores the student's picture as a drawing of something else (what guides a teacher here is CFG)
    teacher_prompt_refusal = ("an image-token prompt is the class or caption to draw, so a teacher reading another "
                              "one scores the student's picture as a drawing of something else; use teacher.cfg_scale "
                              "to guide the teacher, and remove the field (or set data.teacher_prompt_field='')")

    def __init__(self, settings: RunSettings | None = None) -> None:
        super().__init__(settings)
        self._class_names: list[str] | None = None  # the student's classes (None: free-text prompts)
        self._labels: dict[str, int] = {}  # normalised class name -> label
        self._judge: Judge | None = None
        if settings is None:
            return
        if settings.evaluates and not settings.judge:
            raise ConfigError("image_tokens evaluation judges pictures with a classifier: set data.judge to its "
                              "directory (`mmopd toy image` writes one), or leave data.eval empty")
        family = family_of(settings.student_path)
        if family == "emu3" and settings.trains_on_answers:
            raise ConfigError(f"objective.kind={settings.objective} (or sft_weight) trains on target pictures, "
                              "which this adapter cannot encode into Emu3's row layout yet; use on_policy or seq_kd")
        class_conditional = family == "llamagen"
        self._class_names = LlamaGenTokenizer.class_names_at(settings.student_path) if class_conditional else None
        self._labels = _label_lookup(self._class_names or [])
        self._judge = Judge.load(settings.judge) if settings.judge else None  # a wrong one fails now

    def _settings(self) -> RunSettings:
        if self.settings is None:
            raise RuntimeError("ImageTokensAdapter needs the run's settings: get_adapter('image_tokens', "
                               "settings_of(config)) (the Session does it)")
        return self.settings

    # --- loading -------------------------------------------------------------------------------
    def load_processor(self, path: str, role: str) -> Any:
        family = family_of(path)
        loader = LlamaGenTokenizer if family == "llamagen" else TRANSFORMERS_FAMILIES[family][0]
        processor = load_pretrained(loader.from_pretrained, path, role)
        if role == "teacher":
            processor.cfg_scale = self._settings().cfg_scale
        return processor

    def check_pair(self, student_processor: Any, teacher_processor: Any, student: nn.Module,
                   teacher: nn.Module) -> None:
        s, t = student_processor, teacher_processor
        if s.family != t.family:
            raise IncompatibleModelsError(f"the student is a {s.family} model and the teacher a {t.family} model: "
                                          "they read prompts differently and do not share a codebook")
        if (s.codebook_size, s.layout) != (t.codebook_size, t.layout):
            raise IncompatibleModelsError(
                f"codebooks differ: the student draws {s.layout} from {s.codebook_size} codes, the teacher "
                f"{t.layout} from {t.codebook_size}; distil between models that share a VQ tokenizer")
        s_codes, t_codes = s.codebook().float().cpu(), t.codebook().float().cpu()
        if s_codes.shape != t_codes.shape or not torch.allclose(s_codes, t_codes, rtol=1e-2, atol=1e-3):
            raise IncompatibleModelsError(
                f"codebooks differ: both have {s.codebook_size} codes, but the code vectors are not the same (code "
                "k would mean different pictures to the two models); use models trained on the same VQ tokenizer")
        if s.family == "emu3" and not torch.equal(s.space_ids, t.space_ids):
            raise IncompatibleModelsError("the student and teacher vocabularies give the visual and layout tokens "
                                          "different ids, so the teacher would misread the student's pictures; use "
                                          "checkpoints with the same vocabulary_map")
        if s.family == "llamagen":
            if s.class_names != t.class_names:
                raise IncompatibleModelsError(f"class lists differ: student {s.class_names}, teacher {t.class_names}; "
                                              "a label must name the same class for both models")
            check_embedding_rows(student, "student", s.vocab_size)
            check_embedding_rows(teacher, "teacher", t.vocab_size)

    def token_space(self, processor: Any, model: nn.Module) -> TokenSpace:
        """The codebook: token id k is code k in both families."""
        max_new_tokens = self._settings().max_new_tokens
        if max_new_tokens != processor.num_image_tokens:
            raise ConfigError(f"rollout.max_new_tokens={max_new_tokens}, but every picture of this "
                              f"model is {processor.layout} = {processor.num_image_tokens} tokens; set "
                              f"rollout.max_new_tokens={processor.num_image_tokens}")
        if processor.family == "llamagen":
            check_embedding_rows(model, "student", processor.vocab_size)
        if processor.family == "emu3":
            return TokenSpace(len(processor.space_ids), processor.space_ids)
        return TokenSpace(processor.codebook_size)

    def eos_token_ids(self, processor: Any) -> list[int]:
        return []  # pictures have a fixed length

    def eval_sampling(self) -> Sampling:
        return self._settings().sampling

    # --- data --------------------------------------------------------------------------------
    def check_record(self, raw: dict, base_dir: Path) -> dict:
        """`{"label": 3}` or `{"prompt": "a red circle"}` (a class name, for class-conditional models; any
        text for Janus), with an optional `"image"`: a target picture for sft and supervised_kd."""
        self._settings()
        label, prompt, image = raw.get("label"), raw.get("prompt"), raw.get("image")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise RecordError(f"'prompt' must be a non-empty string, got {prompt!r}")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
            raise RecordError(f"'label' must be an integer class index, got {label!r}")
        if self._class_names is None:  # free-text prompts (Janus)
            if label is not None:
                raise RecordError("'label' needs a class-conditional student; this student reads text: give a "
                                  "'prompt' instead")
            if prompt is None:
                raise RecordError("missing 'prompt' (the text to draw)")
        else:
            classes = self._class_names
            if label is None and prompt is None:
                raise RecordError("missing 'label' (a class index) or 'prompt' (a class name)")
            if label is not None and not 0 <= label < len(classes):
                raise RecordError(f"'label' {label} is out of range: the student knows {len(classes)} classes "
                                  f"(0..{len(classes) - 1})")
            named = None if prompt is None else self._labels.get(normalize_prompt(prompt))
            if prompt is not None and named is None:
                raise RecordError(f"'prompt' {prompt!r} names no class of the student; classes: {', '.join(classes)}")
            if label is not None and named is not None and named != label:
                raise RecordError(f"'label' {label} ({classes[label]!r}) and 'prompt' {prompt!r} disagree")
            label = label if label is not None else named
            prompt = classes[label]
        if isinstance(image, dict) and ("bytes" in image or "path" in image):  # a datasets Image feature
            image = image.get("bytes") or image.get("path")
        answer: str | bytes | None = None
        if isinstance(image, bytes):
            try:
                with Image.open(io.BytesIO(image)) as picture:
                    picture.load()  # decodes every pixel, as for a path below
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise RecordError(f"'image' holds {len(image):,} bytes that are not a picture: {err}") from err
            answer = image
        elif image is not None:
            if not isinstance(image, str) or not (base_dir / image).is_file():
                raise RecordError(f"'image' must be the path of a picture relative to the data file (or a datasets "
                                  f"Image); {image!r:.60} is not a file")
            answer = str((base_dir / image).resolve())
            try:
                with Image.open(answer) as picture:
                    picture.load()  # decodes every pixel: a truncated file fails here, not at step 1
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise RecordError(f"'image' {image!r} is not a readable picture: {err}") from err
        return {"label": label, "prompt": prompt, "answer": answer}

    def encode_prompts(self, records: list[dict], processor: Any) -> PromptBatch:
        """Prompt ids and mask [B, P]; state: the unconditional prompts and the scale when guiding, and the
        response layout for Emu3."""
        if processor.family == "llamagen":
            ids = processor.prompt_ids([r["label"] for r in records])  # [B, 2]
            mask = torch.ones_like(ids)
            uncond = (processor.unconditional_ids(len(records)), mask.clone())
        else:
            ids, mask = processor.encode_prompts([r["prompt"] for r in records])  # [B, P]
            uncond = processor.unconditional(ids, mask)
        extras: dict[str, Any] = processor.structure() if processor.family == "emu3" else {}
        if processor.cfg_scale != 1.0:
            extras.update(uncond_ids=uncond[0], uncond_mask=uncond[1], cfg_scale=processor.cfg_scale)
        return PromptBatch(ids, mask, state=extras)

    def measure_prompts(self, records: list[dict], processor: Any) -> list[int | str | None]:
        if processor.family == "llamagen":
            return [2] * len(records)
        return [int(m.sum()) for m in processor.encode_prompts([r["prompt"] for r in records])[1]]

    def encode_answers(self, records: list[dict], processor: Any) -> list[list[int]]:
        """Each record's target picture as codes (the picture is resized to the VQ's input size)."""
        if processor.family == "emu3":
            raise ConfigError("target pictures cannot be encoded into Emu3's row layout yet; use on_policy or seq_kd")
        size = processor.image_size
        pictures = [Image.open(io.BytesIO(r["answer"]) if isinstance(r["answer"], bytes) else r["answer"])
                    .convert("RGB").resize((size, size), Image.BILINEAR) for r in records]
        return processor.encode_images(to_tensor(pictures)).tolist()

    def decode(self, tokens: Tensor, mask: Tensor, processor: Any) -> list[Any]:
        """[B, T] picture tokens -> PIL pictures."""
        return processor.decode_images(tokens)

    def score(self, records: list[dict], responses: list[Any]) -> dict[str, float]:
        """The judge's accuracy on the asked classes and the FID of all pictures against real ones."""
        judge = self.judge()
        judge_labels = _label_lookup(judge.class_names)
        labels = []
        for r in records:
            label = r["label"] if self._class_names is not None else judge_labels.get(normalize_prompt(r["prompt"]))
            if label is None:
                raise RecordError(f"{r.get('_where', 'a record')}: prompt {r['prompt']!r} is none of the judge's "
                                  f"classes ({', '.join(judge.class_names)}), so its picture cannot be scored")
            labels.append(label)
        return judge.accuracy_and_fid(responses, labels)

    def judge(self) -> Judge:
        """The judge loaded from data.judge when the adapter was built, which must classify the student's classes."""
        path = self._settings().judge
        if self._judge is None:
            raise ConfigError("data.judge is not set: scoring pictures needs the judge classifier's directory")
        if self._class_names is not None and self._judge.class_names != self._class_names:
            raise ConfigError(f"data.judge={path} classifies {self._judge.class_names}, but the student draws "
                              f"{self._class_names}; use the judge built with these models")
        return self._judge
