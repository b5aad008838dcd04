"""The VLM and image-token toys as experiment tasks: built once per output dir, with what the FLOP count
needs (the text toy's counterpart is text_task.build_task).

A task is a dict: `modality`, `metric` (the adapter's eval metric), `base` (the toy config's settings as
dotted overrides), `params` (student, teacher, student_trainable: what the language model computes per
token), `vision_flops` (per prompt, for each model: the vision tower's forward; the VLM toy is LLaVA, with
a CLIP tower), `teacher_rows` (2 when the teacher is CFG-guided: a conditional and an unconditional row
per token), `prompt_tokens` and `response_tokens` (means over training records: prompts as encoded,
image tokens included; dataset answers with their end token) and the models' `paths`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmopd.config import load_config
from modalities.image_tokens import toy as image_toy
from modalities.vlm import toy as vlm_toy

VISION_NAMES = ("vision", "multi_modal_projector")  # parameter names of the vision side of a VLM


def build_toy(out: Path, size: str, modality: str) -> Path:
    """The modality's toy config in out (built once and reused); the tiny size shrinks its data and training."""
    config = out / "config.yaml"
    if config.exists():
        return config
    toy = {"image": image_toy, "vlm": vlm_toy}[modality]
    return toy.build_toy(out, progress=False, size=toy.TINY if size == "tiny" else toy.Size())


def flat_overrides(config_path: Path) -> dict[str, Any]:
    """A config file's settings as dotted overrides (`train.lr`: ...), progress bars and trackers off."""
    base = load_config(config_path).to_dict()
    flat = {f"{section}.{key}": value for section, fields in base.items() if isinstance(fields, dict)
            for key, value in fields.items()}
    return {**flat, "modality": base["modality"], "train.progress": False, "train.report_to": []}


def _vision_split(model: torch.nn.Module) -> tuple[int, int]:
    """(language-model parameters, vision-side parameters) of a VLM."""
    vision = sum(p.numel() for n, p in model.named_parameters() if any(v in n for v in VISION_NAMES))
    return sum(p.numel() for p in model.parameters()) - vision, vision


def _vision_tokens(model: torch.nn.Module) -> int:
    """Patches the vision tower runs per picture: (side / patch)², plus a CLS token where it has one."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + int(vision.model_type.startswith("clip"))


def build_modality_task(out: Path, size: str, modality: str) -> dict[str, Any]:
    """Build (or reuse) the toy of `modality` ("vlm" or "image") in out and describe it for the FLOP count."""
    info_path = out / "task.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    import transformers

    from mmopd.data.records import load_jsonl
    from mmopd.models.adapter import get_adapter, settings_of

    config_path = build_toy(out, size, modality)
    base = flat_overrides(config_path)
    config = load_config(config_path)
    adapter = get_adapter(config.modality, settings_of(config))
    paths = {"student": base["student.path"], "teacher": base["teacher.path"]}
    params: dict[str, int] = {}
    vision_flops: dict[str, float] = {}
    records = load_jsonl(Path(base["data.train"]), adapter.check_record).records[:64]
    for role, path in paths.items():
        if modality == "vlm":
            model = transformers.AutoModelForImageTextToText.from_pretrained(path)
            params[role], vision = _vision_split(model)
            pictures = float(np.mean([len(r["images"]) for r in records]))
            vision_flops[role] = 2.0 * vision * _vision_tokens(model) * pictures
        else:
            params[role] = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(path).parameters())
            vision_flops[role] = 0.0
    if modality == "vlm" and base["student.trainable"] != "lm_only":
        raise ValueError("the VLM toy's FLOP count assumes student.trainable: lm_only (no backward through the tower)")
    params["student_trainable"] = params["student"]
    processor = adapter.load_processor(paths["student"], "student")
    prompt_tokens = adapter.encode_prompts(records, processor).attention_mask.sum(1).float().mean().item()
    response_tokens = float(np.mean([len(a) for a in adapter.encode_answers(records, processor)]))
    teacher_rows = 2 if float(base.get("teacher.cfg_scale", 1.0)) != 1.0 else 1
    info = {"size": size, "modality": modality, "metric": adapter.metric, "base": base, "params": params,
            "vision_flops": vision_flops, "teacher_rows": teacher_rows, "prompt_tokens": prompt_tokens,
            "response_tokens": response_tokens, "paths": {**paths, "config": str(config_path)}}
    out.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, indent=1))
    return info


def dataset_through_vq(task: dict[str, Any]) -> dict[str, float]:
    """The judge's accuracy and toy FID on the image toy's eval pictures after a round trip through the VQ
    (the adapter's own encode_answers, as sft trains on them, then decode and score): what a student that drew
    the dataset's own codes would score."""
    from mmopd.data.records import load_jsonl
    from mmopd.models.adapter import get_adapter, settings_of

    config = load_config(task["paths"]["config"])
    adapter = get_adapter(config.modality, settings_of(config))
    processor = adapter.load_processor(task["paths"]["teacher"], "teacher")
    records = load_jsonl(Path(config.data.eval), adapter.check_record).records
    codes = torch.tensor(adapter.encode_answers(records, processor))  # [N, codes per picture]
    return adapter.score(records, adapter.decode(codes, torch.ones_like(codes, dtype=torch.bool), processor))
