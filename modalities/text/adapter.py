"""Causal language models: AutoModelForCausalLM + AutoTokenizer, prompts through the chat template
when the tokenizer has one, exact-match scoring of final answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mmopd.data.records import RecordError, image_parts, text_of
from mmopd.models.adapter import ModalityAdapter, ModelLoadError, load_pretrained, register_adapter
from mmopd.models.compat import (IncompatibleModelsError, check_cross_tokenizer, check_embedding_rows,
                                 same_tokenizer)
from mmopd.step.batch import PromptBatch, TokenSpace


def final_answer(text: str) -> str:
    """The final answer of a response: the text after its last '#' marker (GSM8K's '####' works too),
    stripped; the whole text when there is no marker."""
    return text.rsplit("#", 1)[-1].strip()


def is_correct(response: str, answer: str) -> bool:
    """The text modality's one definition of a correct answer: the response's final answer equals the
    reference's, which must not be empty."""
    target = final_answer(answer)
    return target != "" and final_answer(response) == target


def prompt_text(prompt: str | list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt as the model reads it: wrapped in the chat template when the tokenizer has one; a conversation
    (a list of messages) is rendered by the template, so it needs one."""
    if isinstance(prompt, list):
        if not tokenizer.chat_template:
            raise RecordError(f"a conversational prompt needs a chat template, and the tokenizer "
                              f"{tokenizer.name_or_path!r} has none; give plain 'prompt' strings instead")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def unreadable(records: list[dict], processor: Any) -> list[str | None]:
    """Why the tokenizer cannot read each prompt (None where it can): text that is unknown tokens only
    (whitespace aside) reads as nothing, the tokenizer does not cover the data's script or alphabet."""
    unk = processor.unk_token_id
    if unk is None:  # byte-level vocabularies read any text
        return [None] * len(records)
    texts = [r["prompt"] if isinstance(r["prompt"], str) else "\n".join(m["content"] for m in r["prompt"])
             for r in records]
    out: list[str | None] = []
    for ids in processor(texts, add_special_tokens=False)["input_ids"]:
        known = any(i != unk and processor.decode([i]).strip() for i in ids)
        out.append(None if known else f"the prompt is {len(ids)} tokens, every one unknown "
                   f"({processor.unk_token}) to the student's tokenizer, which does not cover its characters")
    return out


@register_adapter("text")
class TextAdapter(ModalityAdapter):
    metric = "accuracy"
    scores_answers = True
    reports_kl = True  # coverage beside the reverse KL: a collapsed student cannot fake the forward KL
    aligns_text = True  # a teacher with another tokenizer reads the responses' text

    def load_processor(self, path: str, role: str) -> PreTrainedTokenizerBase:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, role)
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"{role} tokenizer at {path} has no eos_token; responses could never end")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # the usual convention for causal LMs without PAD
        tokenizer.padding_side = "left"
        return tokenizer

    def check_pair(self, student_processor: Any, teacher_processor: Any, student: nn.Module,
                   teacher: nn.Module) -> None:
        """Another tokenizer is aligned by character spans, where it can be (`check_cross_tokenizer`)."""
        if not same_tokenizer(student_processor, teacher_processor):
            check_cross_tokenizer(student_processor, teacher_processor)
        if bool(student_processor.chat_template) != bool(teacher_processor.chat_template):
            has = "student" if student_processor.chat_template else "teacher"
            raise IncompatibleModelsError(
                f"only the {has} tokenizer has a chat template, so the two models would read the same prompt "
                "in different formats; give both a chat template or neither")
        check_embedding_rows(student, "student", len(student_processor))
        check_embedding_rows(teacher, "teacher", len(teacher_processor))

    def token_space(self, processor: Any, model: nn.Module) -> TokenSpace:
        check_embedding_rows(model, "student", len(processor))
        return TokenSpace(len(processor))

    def eos_token_ids(self, processor: Any) -> list[int]:
        return [processor.eos_token_id]

    def check_record(self, raw: dict, base_dir: Path) -> dict:
        """`{"prompt": str, "answer": str}`, or a conversation (`data.conversation` unpacked it into a `prompt`
        list of messages); text models read text only, so message contents become strings."""
        prompt = raw.get("prompt")
        if isinstance(prompt, list):
            if image_parts(prompt):
                raise RecordError("the prompt holds {\"type\": \"image\"} parts; text models read no pictures "
                                  "(use modality vlm)")
            prompt = [{"role": m["role"], "content": text_of(m, f"a {m['role']} turn")} for m in prompt]
        elif not isinstance(prompt, str):
            raise RecordError("missing 'prompt' (a string, or 'messages')" if prompt is None else
                              f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        elif not prompt.strip():
            raise RecordError("'prompt' is empty")
        answer = raw.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise RecordError(f"'answer' must be a string, got {type(answer).__name__}")
        return {"prompt": prompt, "answer": answer}

    def encode_prompts(self, records: list[dict], processor: Any) -> PromptBatch:
        texts = [prompt_text(r["prompt"], processor) for r in records]
        enc = processor(texts, padding=True, return_tensors="pt", add_special_tokens=not processor.chat_template)
        return PromptBatch(enc["input_ids"], enc["attention_mask"])

    def measure_prompts(self, records: list[dict], processor: Any) -> list[int | str | None]:
        """Each prompt's length in tokens, or why the student cannot read it: a prompt whose text is unknown tokens
        only (whitespace aside) reads as nothing, the tokenizer does not cover the data's script or alphabet."""
        texts = [prompt_text(r["prompt"], processor) for r in records]
        lengths = [len(ids) for ids in processor(texts, add_special_tokens=not processor.chat_template)["input_ids"]]
        return [length if problem is None else problem
                for length, problem in zip(lengths, unreadable(records, processor))]

    def encode_answers(self, records: list[dict], processor: Any) -> list[list[int]]:
        return [processor(r["answer"], add_special_tokens=False)["input_ids"] + [processor.eos_token_id]
                for r in records]

    def decode(self, tokens: Tensor, mask: Tensor, processor: Any) -> list[str]:
        out = []
        for row, keep in zip(tokens.tolist(), mask.bool().tolist()):
            ids = [t for t, k in zip(row, keep) if k and t != processor.eos_token_id]
            out.append(processor.decode(ids, skip_special_tokens=True))
        return out

    def score(self, records: list[dict], responses: list[str]) -> dict[str, float]:
        """Accuracy over every record: one without an answer (refused when data.eval loads) counts as wrong."""
        hits = [r.get("answer") is not None and is_correct(resp, r["answer"]) for r, resp in zip(records, responses)]
        return {"accuracy": sum(hits) / len(hits)}
