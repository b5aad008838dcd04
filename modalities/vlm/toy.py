"""The VLM toy: shapes-VQA data, a teacher trained here to high accuracy, and a smaller, briefly trained
student of the same family, all saved by path, plus a ready on-policy distillation config.

The student shares the teacher's trained vision side (tower and projector), as real pairs often do
(SmolVLM-256M and -500M share one SigLIP encoder), and has half the language model's layers. What it
lacks is language-model skill, which on-policy distillation with `trainable: lm_only` can teach it.
Measured: with a vision tower of its own, the student's wrong colours and shapes came from its weak
visual features, which an LM-only update cannot fix (0.495 -> 0.645 against a 0.895 teacher)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mmopd.config import ConfigError
from mmopd.data.records import load_jsonl
from mmopd.losses import masked_mean, sampled_token_logprobs
from mmopd.models.adapter import ModalityAdapter, PolicySide
from mmopd.run.evaluation import evaluate_policy
from mmopd.run.schedule import warmup_cosine
from mmopd.step.batch import answers_rollout
from modalities.vlm import shapes
from modalities.vlm.adapter import VLMAdapter
from modalities.vlm.families import FAMILIES, Dims, build_family_model, save_family_model

DEFAULT_FAMILY = "llava"  # fastest on CPU: 94 ms per SFT step of 32 at toy size, 101-187 ms for the others
TRAIN_RECORDS = 4000
EVAL_RECORDS = 1000  # a binomial sd of 0.01 at 0.9: 200 gave 0.02, as much as another CPU moved the demo
MAX_NEW_TOKENS = shapes.MAX_ANSWER_WORDS + 2  # the answer, its end-of-turn token, one spare
IMAGE_TOKENS = 4  # 2×2 tokens: one per cell of the picture's grid

TEACHER = Dims(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=64, vision_layers=2,
               vision_heads=4)
STUDENT = Dims(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, vision_hidden=64, vision_layers=2,
               vision_heads=4)  # the teacher's vision side (shared), half its language-model layers
# 2,000 teacher steps: at 1,200 the teacher of --seed 1 never learnt to read the picture (loss 0.3, accuracy 0.52);
# at 2,000 it does (0.87), and seed 0's ends where it did
TEACHER_STEPS, STUDENT_STEPS = 2000, 150
SFT_LR = 2e-3
VISION_LR_SCALE = 0.1
BATCH_SIZE = 32
WARMUP = 30

DISTILL_SETTINGS: dict[str, Any] = {
    "student": {"trainable": "lm_only"},  # the vision tower keeps what SFT taught it; the LM learns from the teacher
    "objective": {"kind": "on_policy", "divergence": "reverse_kl", "estimator": "full"},
    "rollout": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0},
    # lr 2e-3: at 4e-3 the student's climb stalled or not by the CPU (0.725 to 0.890 after 1,000 steps); at 2e-3 it
    # climbs in fewer steps (0.855 after 500, its schedule's end, against 0.67 at 4e-3) and levels off
    "train": {"steps": 1000, "batch_size": 32, "lr": 2e-3, "warmup": 10, "save_every": 0, "eval_every": 250,
              "eval_batch_size": 250, "max_grad_norm": 1.0},
}



@dataclass(frozen=True)
class Size:
    """How much data and training a build gets: the defaults are the demo's toy; TINY is the plumbing only."""

    train_records: int = TRAIN_RECORDS
    eval_records: int = EVAL_RECORDS
    teacher_steps: int = TEACHER_STEPS
    student_steps: int = STUDENT_STEPS


TINY = Size(train_records=24, eval_records=6, teacher_steps=2, student_steps=2)

def fit(adapter: ModalityAdapter, model: nn.Module, processor: Any, records: list[dict], steps: int, lr: float,
        batch_size: int, seed: int, warmup: int = WARMUP, progress: bool = False) -> list[float]:
    """Supervised fine-tuning on the answers (NLL of answer + end-of-turn), AdamW with warmup then cosine.

    The vision tower and projector learn at VISION_LR_SCALE × lr: at the full rate, Adam's early noisy
    steps scramble the random visual features before the language model learns to read them."""
    gen = torch.Generator().manual_seed(seed)
    language = {id(p) for part in (model.get_decoder(), model.get_output_embeddings()) for p in part.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in language], "lr": lr},
              {"params": [p for p in trainable if id(p) not in language], "lr": lr * VISION_LR_SCALE}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(warmup, max(steps - 1, 0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    space = adapter.token_space(processor, model)
    pad = processor.tokenizer.pad_token_id
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(steps):
        batch = [records[i] for i in torch.randint(len(records), (batch_size,), generator=gen).tolist()]
        prompts = adapter.encode_prompts(batch, processor)
        answers = answers_rollout(adapter.encode_answers(batch, processor), pad, torch.device("cpu"))
        logits = space.restrict(adapter.calls.response_logits(model, prompts, answers.tokens))  # [B, T, A]
        loss = masked_mean(-sampled_token_logprobs(logits, space.to_actions(answers.tokens)), answers.mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"  step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s", flush=True)
    model.eval()
    return losses


def share_vision(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the teacher's vision tower and projector (every part but the language model) into the student
    and freeze them there; the shapes must match (same vision dims, same LM width)."""
    language = student.get_decoder()
    for name, part in student.model.named_children():
        if part is not language:
            part.load_state_dict(teacher.model.get_submodule(name).state_dict())
            part.requires_grad_(False)


def accuracy(adapter: ModalityAdapter, model: nn.Module, processor: Any, records: list[dict],
             batch_size: int = 100) -> float:
    """Greedy exact-match accuracy, through the same evaluation the trainer uses."""
    space = adapter.token_space(processor, model)
    eos = adapter.eos_token_ids(processor)
    side = PolicySide(adapter, model, processor, space, eos, processor.tokenizer.pad_token_id)
    result = evaluate_policy(side, records, MAX_NEW_TOKENS, batch_size, torch.device("cpu"))
    return result["metrics"]["accuracy"]


def build(out_dir: Path, family: str | None, progress: bool = True, seed: int = 0) -> Path:
    """The `mmopd toy vlm` entry point: `build_toy` with the default family unless one is named."""
    return build_toy(out_dir, family or DEFAULT_FAMILY, progress, seed=seed)


def build_toy(out_dir: Path, family: str = DEFAULT_FAMILY, progress: bool = True, size: Size = Size(),
              seed: int = 0) -> Path:
    """Data in out_dir/data, teacher and student in out_dir/{teacher,student}, drawn from `seed`; returns
    out_dir/config.yaml."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown VLM toy family {family!r}; available: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir).resolve()
    say = print if progress else (lambda *a, **k: None)
    adapter = VLMAdapter()
    data = out_dir / "data"
    paths = {"train": shapes.write_split(data, "train", size.train_records, seed=seed + 1, held_out=False),
             "eval": shapes.write_split(data, "eval", size.eval_records, seed=seed + 2, held_out=True)}
    train = load_jsonl(paths["train"], adapter.check_record).records
    evals = load_jsonl(paths["eval"], adapter.check_record).records
    scores, teacher = {}, None
    for role, dims, steps, model_seed in (("teacher", TEACHER, size.teacher_steps, seed),
                                          ("student", STUDENT, size.student_steps, seed + 1)):
        say(f"training the {family} {role} ({steps} SFT steps)")
        built = build_family_model(family, shapes.WORDS, dims, image_tokens=IMAGE_TOKENS, seed=model_seed)
        if teacher is not None:
            share_vision(teacher, built.model)
        save_family_model(built, out_dir / role)
        processor = adapter.load_processor(str(out_dir / role), role)
        fit(adapter, built.model, processor, train, steps, SFT_LR, BATCH_SIZE, model_seed, progress=progress)
        scores[role] = accuracy(adapter, built.model, processor, evals)
        save_family_model(built, out_dir / role)
        say(f"  {role} eval accuracy {scores[role]:.3f}")
        teacher = built.model
    config = {"modality": "vlm",
              "student": {"path": str(out_dir / "student"), **DISTILL_SETTINGS["student"]},
              "teacher": {"path": str(out_dir / "teacher")},
              "data": {"train": str(paths["train"]), "eval": str(paths["eval"])},
              **{k: v for k, v in DISTILL_SETTINGS.items() if k != "student"}}
    config["train"] = {**config["train"], "out_dir": str(out_dir / "runs" / "on_policy")}
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
