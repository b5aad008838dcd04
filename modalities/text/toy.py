"""Synthetic multi-digit addition task with step-by-step reasoning, a char tokenizer, and a trained teacher/student pair."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from mmopd.config import ConfigError
from mmopd.run.schedule import warmup_cosine
from modalities.text.adapter import is_correct

TASK_NAME = "addition"

DIGITS = 3
STEP_SEP = ";"
FINAL_MARKER = "#"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
CHARS = "0123456789+=" + STEP_SEP + FINAL_MARKER
MAX_LENGTH = 64
ROPE_THETA = 100.0

MODEL_SIZES: dict[str, dict[str, int]] = {
    "teacher": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512},
    "student": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 384},
    # the same width in three heads of 32: vLLM's CPU attention supports head sizes 32, 64, ... (not 24)
    "student_hd32": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 384},
    # a mixture of experts (Qwen3-MoE): 4 experts of a quarter of the dense MLP each, 2 routed a token
    "student_moe": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 384,
                    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 192},
    # the teacher's width as a mixture of experts: 4 experts of half the dense MLP, 2 routed a token
    "teacher_moe": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512,
                    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256},
}
# family -> student size
FAMILIES = {"qwen3": "student", "qwen3_hd32": "student_hd32", "qwen3_moe": "student_moe", "cross_tokenizer": "student"}
OWN_TOKENIZER = {"cross_tokenizer"}  # families whose student reads column sums as tokens (build_pieces_tokenizer)

MAX_NEW_TOKENS = 20
TRAIN_RECORDS = 20000
EVAL_RECORDS = 500
TEACHER_STEPS = 400
TEACHER_LR = 3e-3
STUDENT_STEPS = 150
STUDENT_LR = 3e-3
BATCH_SIZE = 128
WARMUP = 50


def reasoning(a: int, b: int) -> str:
    """Per-digit column sums (carry included, two digits each), least significant first, then the final sum."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        total = int(xs[i] if i < len(xs) else 0) + int(ys[i] if i < len(ys) else 0) + carry
        steps.append(f"{total:02d}")
        carry = total // 10
    return "".join(s + STEP_SEP for s in steps) + FINAL_MARKER + str(a + b)


def make_records(n: int, seed: int, digits: int = DIGITS) -> list[dict]:
    """Sample n addition problems of two `digits`-digit operands with their reasoning answers."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    records = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        records.append({"prompt": f"{a}+{b}=", "answer": reasoning(a, b)})
    return records


def final_answer(text: str) -> str:
    """The toy format's final answer: digits after the last marker, or "" when the text is not well formed
    (checks records; whether a response is correct is `modalities.text.adapter.is_correct`)."""
    if FINAL_MARKER not in text:
        return ""
    tail = text.rsplit(FINAL_MARKER, 1)[1]
    for special in (EOS_TOKEN, PAD_TOKEN):
        tail = tail.replace(special, "")
    tail = tail.strip()
    return tail if tail.isascii() and tail.isdigit() else ""


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Char-level WordLevel tokenizer: one char per token, pad/eos/unk specials, left padding."""
    specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MAX_LENGTH,
        padding_side="left",
    )
    return tokenizer


def build_pieces_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Another tokenizer over the same text: each column sum with its separator is one token ("13;"), every other
    character one token, the same special tokens at other ids (the vocabularies differ). "347+586=" reads as
    characters, "13;13;09;#933" as "13;", "13;", "09;", "#", "9", "3", "3"."""
    sums = [f"{n:02d}{STEP_SEP}" for n in range(100)]
    vocab = {tok: i for i, tok in enumerate([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN] + sums + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"[0-9][0-9]{STEP_SEP}|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                                unk_token=UNK_TOKEN, model_max_length=MAX_LENGTH,
                                                padding_side="left")


def student_tokenizer(family: str | None) -> transformers.PreTrainedTokenizerFast:
    """The student's tokenizer in a family: the teacher's characters, or column sums (OWN_TOKENIZER)."""
    return build_pieces_tokenizer() if family in OWN_TOKENIZER else build_tokenizer()


def build_model(tokenizer: transformers.PreTrainedTokenizerFast, size: str) -> transformers.PreTrainedModel:
    """Tiny randomly initialised Qwen3 causal LM (Qwen3-MoE where the size has experts); vocab padded up to a
    multiple of 8."""
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    dims = MODEL_SIZES[size]
    moe = "num_experts" in dims
    config = (transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config)(
        vocab_size=8 * math.ceil(len(tokenizer) / 8),
        head_dim=dims["hidden_size"] // dims["num_attention_heads"],
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=MAX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )
    model = (transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def encode_sft(tokenizer: transformers.PreTrainedTokenizerFast, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer+EOS ids, attention mask and labels masked to answer+EOS."""
    rows, label_rows = [], []
    for r in records:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        label_rows.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels  # [N, T] each


def fit(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerFast,
    records: list[dict],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: int = WARMUP,
    progress: bool = False,
) -> list[float]:
    """Teacher-forced SFT on answer+EOS tokens with AdamW and linear warmup then cosine decay; returns per-step losses."""
    ids, mask, labels = encode_sft(tokenizer, records)  # [N, T]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(warmup, max(steps - 1, 0))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    model.train()
    losses = []
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(records), (batch_size,), generator=gen)
        width = int(mask[idx].sum(1).max())
        out = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width], labels=labels[idx, :width])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {time.time() - t0:.1f}s", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerFast,
    records: list[dict],
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Fraction of records whose greedy (left-padded, batched) response has the right final answer."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # [B, T_prompt + T_new]
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(is_correct(t, r["answer"]) for t, r in zip(texts, chunk))
    model.train(was_training)
    return correct / max(len(records), 1)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def split_records(seed: int) -> tuple[list[dict], list[dict]]:
    """Train records and eval records whose prompts never occur in train."""
    train = make_records(TRAIN_RECORDS, seed)
    seen = {r["prompt"] for r in train}
    pool = make_records(4 * EVAL_RECORDS, seed + 1)
    evals = [r for r in pool if r["prompt"] not in seen][:EVAL_RECORDS]
    return train, evals


def build_untrained(out_dir: str | Path, student: str = "student", family: str | None = None) -> dict[str, Path]:
    """Random (untrained) teacher and student (of size `student`, with the tokenizer of `family`'s student) with
    their tokenizers, 32 train and 8 eval records, under out_dir: the plumbing of a text run without the minutes
    of training (tests and smoke runs)."""
    out = Path(out_dir)
    torch.manual_seed(0)
    paths = {}
    for role, size, tokenizer in (("teacher", "teacher", build_tokenizer()),
                                  ("student", student, student_tokenizer(family))):
        model = build_model(tokenizer, size)
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        paths[role] = out / role
    for split, n, seed in (("train", 32, 1), ("eval", 8, 2)):
        paths[split] = out / "data" / f"{split}.jsonl"
        write_jsonl(paths[split], make_records(n, seed=seed))
    return paths


def build(out_dir: Path, family: str | None, progress: bool = True, seed: int = 0) -> Path:
    """The `mmopd toy text` entry point: the toy in out_dir and its on-policy config; returns the config's path."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"text toy family {family!r} is not available; choose one of {', '.join(FAMILIES)} "
                          "(qwen3_hd32: a student vLLM's CPU attention can run; cross_tokenizer: a student that reads "
                          "pieces of digits, the teacher characters)")
    out_dir = Path(out_dir).resolve()
    built = build_toy(out_dir, seed, progress=progress, student=FAMILIES[family or "qwen3"], family=family)
    config = {
        "modality": "text",
        "student": {"path": built["paths"]["student"]},
        "teacher": {"path": built["paths"]["teacher"]},
        "data": {"train": built["paths"]["train"], "eval": built["paths"]["eval"]},
        # a student with its own tokenizer: the span estimator, the one across tokenizers for now
        "objective": {"kind": "on_policy", "divergence": "reverse_kl",
                      "estimator": "sampled" if family in OWN_TOKENIZER else "full"},
        "rollout": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0},
        "train": {"steps": 200, "batch_size": 128, "lr": 1.0e-3, "warmup": 50, "eval_every": 50,
                  "save_every": 100, "eval_batch_size": 250, "out_dir": str(out_dir / "runs" / "on_policy")},
    }
    if family in OWN_TOKENIZER:  # the sampled estimator learns here with 4 samples a prompt (RESULTS.md, section 2)
        config["rollout"]["samples_per_prompt"] = 4
        config["train"]["batch_size"] = 64
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_toy(out_dir: str | Path, seed: int = 0, progress: bool = True, student: str = "student",
              family: str | None = None) -> dict[str, Any]:
    """Write data, a trained teacher and a briefly trained smaller student (with `family`'s tokenizer) under out_dir;
    return accuracies and paths."""
    out = Path(out_dir)
    paths = {
        "train": out / "data" / "train.jsonl",
        "eval": out / "data" / "eval.jsonl",
        "teacher": out / "teacher",
        "student": out / "student",
    }
    t0 = time.time()
    train, evals = split_records(seed)
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evals)
    tokenizers = {"teacher": build_tokenizer(), "student": student_tokenizer(family)}
    result: dict[str, Any] = {"task": TASK_NAME, "max_new_tokens": MAX_NEW_TOKENS}
    for role, size, steps, lr, offset in (("teacher", "teacher", TEACHER_STEPS, TEACHER_LR, 0),
                                          ("student", student, STUDENT_STEPS, STUDENT_LR, 1)):
        tokenizer = tokenizers[role]
        torch.manual_seed(seed + offset)
        model = build_model(tokenizer, size)
        if progress:
            print(f"[toy] {role}: {sum(p.numel() for p in model.parameters())} params, {steps} SFT steps", flush=True)
        fit(model, tokenizer, train, steps, lr, BATCH_SIZE, seed + offset, progress=progress)
        accuracy = greedy_accuracy(model, tokenizer, evals, MAX_NEW_TOKENS)
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
        result[f"{role}_accuracy"] = accuracy
        if progress:
            print(f"[toy] {role}: greedy accuracy {accuracy:.3f} ({time.time() - t0:.0f}s)", flush=True)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    result["seconds"] = time.time() - t0
    return result
