"""The image toy: coloured-shape pictures, a VQ tokenizer, a CFG teacher, a weaker student and a judge.

`build_toy(out)` writes, all loadable by path:
    data/{train,eval}.jsonl + data/img/   labelled pictures (records: label, prompt, image)
    teacher/, student/                    LlamaForCausalLM generators (save_pretrained) + image tokenizer + vq/
    judge/                                the timm classifier and the real pictures' feature statistics
    config.yaml                           CFG distillation: unguided student <- guided teacher
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import LlamaForCausalLM

from mmopd.config import ConfigError
from mmopd.run.schedule import warmup_cosine
from modalities.image_tokens import shapes
from modalities.image_tokens.judge import Judge
from modalities.image_tokens.llamagen import LlamaGenTokenizer, build_generator
from modalities.image_tokens.vq import VQConfig, VQModel

TRAIN_PICTURES, EVAL_PER_CLASS = 3000, 100  # 600 eval pictures: a binomial sd of 0.01 at 0.94 (240: 0.015)
VQ = {"image_size": shapes.IMAGE_SIZE, "channels": 32, "downsamples": 2, "codebook_size": 64, "code_dim": 8}
# 1,200 VQ steps: its loss still fell at 400, where the judge read the VQ's reconstructions of real pictures right
# 0.95 of the time on one CPU and 0.86 on another, a ceiling for every generator; at 1,200 it reads them all
VQ_STEPS, VQ_LR, VQ_BATCH = 1200, 2e-3, 64
JUDGE_STEPS = 200
SIZES: dict[str, dict[str, int]] = {
    "teacher": {"hidden": 96, "layers": 3, "heads": 4, "intermediate": 256},
    "student": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128},
}
TEACHER_STEPS, TEACHER_LR = 500, 3e-3
STUDENT_STEPS, STUDENT_LR = 150, 3e-3  # a weak start: OPD has a gap to close that is training, not capacity
GENERATOR_BATCH, WARMUP = 64, 30
CLASS_DROPOUT = 0.1  # the share of pictures the teacher sees under the null class: its unconditional branch
CFG_SCALE = 2.0

DISTILL_SETTINGS: dict[str, Any] = {
    "objective": {"kind": "on_policy", "divergence": "reverse_kl", "estimator": "full"},
    "rollout": {"temperature": 1.0},
    "train": {"steps": 300, "batch_size": 32, "lr": 2e-3, "warmup": 10, "save_every": 0, "eval_every": 50,
              "eval_batch_size": 600, "max_grad_norm": 1.0},
}



@dataclass(frozen=True)
class Size:
    """How much data and training a build gets: the defaults are the demo's toy; TINY is the plumbing only."""

    train_pictures: int = TRAIN_PICTURES
    eval_per_class: int = EVAL_PER_CLASS
    vq_steps: int = VQ_STEPS
    judge_steps: int = JUDGE_STEPS
    teacher_steps: int = TEACHER_STEPS
    student_steps: int = STUDENT_STEPS


TINY = Size(train_pictures=64, eval_per_class=2, vq_steps=2, judge_steps=2, teacher_steps=2, student_steps=2)

def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def train_vq(pixels: torch.Tensor, config: VQConfig, steps: int, seed: int = 0, progress: bool = False) -> VQModel:
    """Fit a VQ on pictures [N, 3, H, W] in [-1, 1] (Adam, dead codes restarted every 25 steps for the
    first 70% of training)."""
    torch.manual_seed(seed)
    vq = VQModel(config).train()
    opt = torch.optim.Adam(vq.parameters(), lr=VQ_LR)
    gen = torch.Generator().manual_seed(seed)
    usage = torch.zeros(vq.config.codebook_size)
    for step in range(steps):
        batch = pixels[torch.randint(len(pixels), (VQ_BATCH,), generator=gen)]
        _, loss, codes = vq(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(codes.flatten(), minlength=vq.config.codebook_size)
        if (step + 1) % 25 == 0:
            if step < 0.7 * steps:
                with torch.no_grad():
                    vq.restart_dead_codes(vq.encoder(batch), usage)
            usage.zero_()
        if progress and (step + 1) % 100 == 0:
            print(f"  vq step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    return vq.eval()


def generator_batch(tokenizer: LlamaGenTokenizer, codes: torch.Tensor, labels: torch.Tensor,
                    class_dropout: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids `[class, boi, codes]` [B, 2+N] and labels masking the prompt, with `class_dropout` of the
    rows moved to the null class."""
    ids = torch.cat([tokenizer.prompt_ids(labels.tolist()), codes], dim=1)
    drop = torch.rand(len(labels), generator=gen) < class_dropout
    ids[drop, 0] = tokenizer.null_class_id
    targets = ids.clone()
    targets[:, :2] = -100
    return ids, targets


def fit_generator(model: LlamaForCausalLM, tokenizer: LlamaGenTokenizer, codes: torch.Tensor, labels: torch.Tensor,
                  steps: int, lr: float, class_dropout: float, seed: int, progress: bool = False) -> list[float]:
    """Next-code NLL on encoded pictures codes [N, grid²] with labels [N]; AdamW, warmup then cosine."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = min(WARMUP, steps - 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(codes), (GENERATOR_BATCH,), generator=gen)
        ids, targets = generator_batch(tokenizer, codes[idx], labels[idx], class_dropout, gen)
        loss = model(input_ids=ids, labels=targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    return losses


def build(out_dir: Path, family: str | None, progress: bool = True, seed: int = 0) -> Path:
    """The `mmopd toy image` entry point: the built-in llamagen generator is the only toy family."""
    if family not in (None, "llamagen"):
        raise ConfigError(f"image toy family {family!r} is not available; the image toy trains the built-in "
                          "llamagen generator (Janus is covered by configs/janus_pro_7b_to_1b.yaml)")
    return build_toy(out_dir, progress=progress, seed=seed)


def build_toy(out_dir: Path, progress: bool = True, seed: int = 0, size: Size = Size()) -> Path:
    """Write the whole toy into out_dir (see the module docstring) and return the config's path."""
    out_dir = Path(out_dir).resolve()
    started = time.perf_counter()
    data = out_dir / "data"
    train_path = shapes.write_split(data, "train", size.train_pictures, seed=seed + 1)
    eval_path = shapes.write_split(data, "eval", size.eval_per_class * len(shapes.CLASS_NAMES), seed=seed + 2)
    pictures, labels = shapes.make_images(size.train_pictures, seed=seed + 1)  # the pictures written above
    pixels, label_ids = shapes.to_tensor(pictures), torch.tensor(labels)

    _say(progress, f"[toy image] VQ tokenizer ({VQ['codebook_size']} codes, {VQ['image_size']} px -> "
                   f"{VQ['image_size'] // 2 ** VQ['downsamples']}² grid)")
    vq = train_vq(pixels, VQConfig(**VQ), size.vq_steps, seed=seed, progress=progress)
    tokenizer = LlamaGenTokenizer(vq, shapes.CLASS_NAMES)
    codes = tokenizer.encode_images(pixels)  # [N, grid²]

    _say(progress, "[toy image] judge (timm classifier)")
    judge = Judge.build(shapes.CLASS_NAMES, shapes.IMAGE_SIZE)
    judge.fit(pictures, labels, size.judge_steps, seed=seed)
    judge.save(out_dir / "judge")

    paths = {}
    for role, steps, lr, dropout in (("teacher", size.teacher_steps, TEACHER_LR, CLASS_DROPOUT),
                                     ("student", size.student_steps, STUDENT_LR, 0.0)):
        _say(progress, f"[toy image] {role}: {steps} steps")
        torch.manual_seed(seed + (role == "student"))
        model = build_generator(tokenizer, **SIZES[role])
        fit_generator(model, tokenizer, codes, label_ids, steps, lr, dropout, seed=seed, progress=progress)
        model.eval().save_pretrained(out_dir / role)
        tokenizer.save_pretrained(out_dir / role)
        paths[role] = str(out_dir / role)

    config = {
        "modality": "image_tokens",
        "student": {"path": paths["student"]},
        "teacher": {"path": paths["teacher"], "cfg_scale": CFG_SCALE},
        "data": {"train": str(train_path), "eval": str(eval_path), "judge": str(out_dir / "judge")},
        **{k: dict(v) for k, v in DISTILL_SETTINGS.items()},
    }
    config["rollout"]["max_new_tokens"] = tokenizer.num_image_tokens
    config["train"]["out_dir"] = str(out_dir / "runs" / "cfg_distillation")
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    _say(progress, f"[toy image] built in {time.perf_counter() - started:.0f} s")
    return path
