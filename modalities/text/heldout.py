"""Held-out measurements of a student against its teacher, for causal LMs that share a tokenizer, on saved
checkpoints (the trainer's own eval reports the same two KLs through `mmopd.run.evaluation.kl_to_teacher`).

Two KLs that a collapsed student cannot fake together:

- reverse KL, KL(student‖teacher) per token on the student's own samples: what on-policy distillation minimises;
  a student that found one string the teacher also likes drives it down while getting worse.
- forward KL, KL(teacher‖student) per token on the teacher's samples (coverage): how well the student predicts
  what the teacher writes; a collapsed student puts no mass there, so it rises.

    samples = sample(teacher, tokenizer, prompts, max_new_tokens=24, seed=0)    # the teacher's, fixed once
    heldout_kls(student, teacher, tokenizer, prompts, samples, max_new_tokens=24)  # {"reverse_kl", "forward_kl", ...}

Both are exact over the whole vocabulary, one row at a time (a 262k vocabulary makes [B, T, V] large).
`measure` adds the health of the student's samples (`mmopd.step.health`) and its accuracy on a task with checkable
answers (`modalities.text.fewshot`); `teacher_records` turns prompts into records whose answers are the teacher's
samples, for the objectives that train on answers (sft as seq-KD, supervised_kd, gkd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from mmopd.step.health import SURPRISAL, sample_health
from modalities.text.fewshot import task_accuracy, task_records
from modalities.text.stdlib_prompts import HELD_OUT_MODULES, TRAIN_MODULES, docstring_prompts


@torch.no_grad()
def sample(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
           seed: int, batch_size: int = 8, temperature: float = 1.0) -> list[list[int]]:
    """Token ids of one sampled response per prompt (up to and including EOS), from a fixed seed."""
    torch.manual_seed(seed)
    out: list[list[int]] = []
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature or None, top_k=0, top_p=1.0,
                             pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():  # [B, T]
            ids = []
            for token in row:
                ids.append(token)
                if token == tokenizer.eos_token_id:
                    break
            out.append(ids)
    return out


@torch.no_grad()
def _response_logprobs(model: nn.Module, prompt_ids: list[int], response: list[int]) -> Tensor:
    """log-softmax over the vocabulary at each response position: [T, V]."""
    ids = torch.tensor([prompt_ids + response])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]  # [T, V]
    return F.log_softmax(logits.float(), dim=-1)


def kl_per_token(p_model: nn.Module, q_model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                 responses: list[list[int]]) -> float:
    """KL(p‖q) per response token, summed over the vocabulary exactly, on the given responses."""
    total, count = 0.0, 0
    for prompt, response in zip(prompts, responses):
        if not response:
            continue
        prompt_ids = tokenizer(prompt)["input_ids"]
        log_p = _response_logprobs(p_model, prompt_ids, response)  # [T, V]
        log_q = _response_logprobs(q_model, prompt_ids, response)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        count += len(response)
    if not count:
        raise ValueError("every response is empty; there are no tokens to measure a KL on")
    return total / count


def heldout_kls(student: nn.Module, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                teacher_samples: list[list[int]], max_new_tokens: int, seed: int = 0) -> dict[str, object]:
    """The student's reverse KL on its own samples and its forward KL on `teacher_samples`, per token; also the
    student's samples, for reading and for health metrics."""
    student_samples = sample(student, tokenizer, prompts, max_new_tokens, seed)
    return {"reverse_kl": kl_per_token(student, teacher, tokenizer, prompts, student_samples),
            "forward_kl": kl_per_token(teacher, student, tokenizer, prompts, teacher_samples),
            "student_samples": student_samples}


def teacher_records(teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                    seed: int) -> list[dict[str, str]]:
    """`{"prompt", "answer"}` records whose answer is one teacher sample (temperature 1) of the prompt; a prompt
    whose sample is empty (the teacher ended at once) has no record."""
    samples = sample(teacher, tokenizer, prompts, max_new_tokens, seed)
    records = [{"prompt": p, "answer": tokenizer.decode(s, skip_special_tokens=True)} for p, s in zip(prompts, samples)]
    return [r for r in records if r["answer"].strip()]


@torch.no_grad()
def greedy_responses(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     max_new_tokens: int = 4, batch_size: int = 8) -> list[str]:
    """The decoded greedy continuation of each prompt."""
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def measure(student: nn.Module, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, held_out: list[str],
            teacher_samples: list[list[int]], task: list[dict], max_new_tokens: int) -> dict[str, object]:
    """Both KLs on `held_out`, the health of the student's samples there (`health/*`), its greedy accuracy on
    `task`, and its first samples as text."""
    kls = heldout_kls(student, teacher, tokenizer, held_out, teacher_samples, max_new_tokens)
    samples = kls.pop("student_samples")
    tokens = torch.full((len(samples), max_new_tokens), tokenizer.pad_token_id)  # [B, T]
    mask = torch.zeros(len(samples), max_new_tokens)
    for i, row in enumerate(samples):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    health = sample_health(tokens, mask, torch.zeros_like(mask), max_new_tokens)
    health.pop(SURPRISAL)  # HF's generate does not hand back the samples' log-probs
    answers = greedy_responses(student, tokenizer, [r["prompt"] for r in task])
    return {**kls, **health, "task_accuracy": task_accuracy(task, answers),
            "samples": [tokenizer.decode(row, skip_special_tokens=True) for row in samples]}


def docstring_task_data(teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, train_prompts: int,
                        held_out: int, max_new_tokens: int) -> dict[str, list]:
    """The data of a real-model run: `train`, records of `train_prompts` docstring prompts and the task's train
    split answered by teacher samples; `held_out`, docstring prompts from other modules; `held_out_teacher`, a
    teacher sample (token ids) of each; `task`, the task's eval split."""
    prompts = docstring_prompts(TRAIN_MODULES)[:train_prompts] + [r["prompt"] for r in task_records("train")]
    held = docstring_prompts(HELD_OUT_MODULES)[:held_out]
    return {"train": teacher_records(teacher, tokenizer, prompts, max_new_tokens, seed=1234), "held_out": held,
            "held_out_teacher": sample(teacher, tokenizer, held, max_new_tokens, seed=4321),
            "task": task_records("eval")}
