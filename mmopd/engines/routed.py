"""Several teachers by route (MOPD): each record names its teacher in a field (`data.teacher_field`, default
`"teacher"`), and `RoutedTeacher` scores each teacher's rows with that teacher's own scorer (hf or served), then
puts the scores back in row order, so the objective sees one teacher's `Scores`.

    teacher:
      - {name: math, path: runs/math-teacher}
      - {name: code, engine: vllm, url: http://127.0.0.1:8001, path: Qwen/Qwen3-8B}
    records: {"prompt": "2+2=", "teacher": "math"}

Each teacher encodes its rows' prompts with its own processor (its chat template) and reads the same response
tokens, so the teachers must share one vocabulary (`check_same_vocabulary`). One step's teachers hand over one
kind of score (config validation makes them agree on top_k, tail, cfg_scale); full distributions are stacked
as logits [B, T, A] (over the student's action space, the same for every teacher). `divergences` logs the
divergence of each teacher's rows as `divergence/<name>`, beside the overall `divergence`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from mmopd.data.records import RecordError
from mmopd.engines.base import TeacherNeed, TeacherScorer
from mmopd.models.adapter import ModalityAdapter
from mmopd.models.compat import IncompatibleModelsError
from mmopd.step.batch import PromptBatch, Rollout
from mmopd.step.scores import Hidden, Scores

ROUTE = "_teacher"  # the record key holding the checked teacher name
RECORDS = "records"  # the PromptBatch.state key holding the step's records (what RoutedTeacher routes by)


def routing_check(check: Callable[[dict, Path], dict], field: str,
                  names: list[str]) -> Callable[[dict, Path], dict]:
    """The adapter's record check, plus the record's teacher: `field`'s value, one of `names` (a lone teacher
    may go unnamed)."""

    def checked(raw: dict, base_dir: Path) -> dict:
        record = check(raw, base_dir)
        name = raw.get(field)
        if name is None and len(names) == 1:
            name = names[0]
        if name is None:
            raise RecordError(f"no {field!r} field naming its teacher; with several teachers every record needs one "
                              f"of {', '.join(names)} (data.teacher_field names the field)")
        if name not in names:
            raise RecordError(f"{field!r} is {name!r}, which is no teacher; the teachers are {', '.join(names)}")
        record[ROUTE] = name
        return record

    return checked


def check_same_vocabulary(processors: dict[str, Any]) -> None:
    """Refuse teachers whose tokenizers differ: each reads the same response token ids."""
    vocabularies = {name: getattr(p, "tokenizer", p).get_vocab() for name, p in processors.items()}
    (first, vocab), *rest = vocabularies.items()
    for name, other in rest:
        if other != vocab:
            token = next(iter(sorted(set(vocab.items()) ^ set(other.items()))), ("?", -1))
            raise IncompatibleModelsError(
                f"teachers {first!r} ({len(vocab)} tokens) and {name!r} ({len(other)} tokens) have different "
                f"vocabularies (e.g. {token[0]!r} → {token[1]}); every teacher scores the same response token ids, "
                "so they must share one tokenizer")


class RoutedTeacher:
    """One scorer per teacher; each row is scored by the teacher its record names. [B, T] -> Scores"""

    def __init__(self, adapter: ModalityAdapter, scorers: dict[str, TeacherScorer], processors: dict[str, Any]):
        self.adapter, self.scorers, self.processors = adapter, scorers, processors

    def rows(self, records: list[dict]) -> dict[str, Tensor]:
        """Each teacher's row indices in this batch (teachers without rows left out). -> {name: [b]}"""
        names = [r[ROUTE] for r in records]
        return {name: torch.tensor([i for i, n in enumerate(names) if n == name]) for name in self.scorers
                if name in names}

    def score(self, prompts: PromptBatch, tokens: Tensor, need: TeacherNeed) -> Scores:
        records = prompts.state[RECORDS]
        parts = {}
        for name, rows in self.rows(records).items():
            sub = self.adapter.encode_prompts([records[i] for i in rows], self.processors[name]).to(tokens.device)
            parts[name] = (rows, self.scorers[name].score(sub, tokens[rows.to(tokens.device)], need))
        return _in_row_order(parts, tokens.shape[0])

    def divergences(self, records: list[dict], loss: Callable[[Rollout], tuple[Tensor, dict[str, float]]],
                    responses: Rollout) -> dict[str, float]:
        """`divergence/<name>`: the loss's divergence over each teacher's rows only (its response tokens' mean)."""
        out = {}
        with torch.no_grad():
            for name, rows in self.rows(records).items():
                keep = torch.zeros_like(responses.mask)
                keep[rows.to(keep.device)] = 1.0
                _, values = loss(Rollout(responses.tokens, responses.mask * keep, responses.logprobs))
                out[f"divergence/{name}"] = values["divergence"]
        return out


def _in_row_order(parts: dict[str, tuple[Tensor, Scores]], B: int) -> Scores:
    """One Scores of B rows from each teacher's rows' Scores (all of one form, per-row tensors)."""
    (_, first), *_ = parts.values()
    if isinstance(first, Hidden):  # each teacher's hidden states go with its own head: no rows to stack
        raise TypeError("several teachers' Hidden scores cannot share one batch; score them as logits")
    values = {}
    for f in dataclasses.fields(first):
        sample = getattr(first, f.name)
        out = sample.new_zeros((B, *sample.shape[1:]))
        for rows, scores in parts.values():
            out[rows.to(out.device)] = getattr(scores, f.name)
        values[f.name] = out
    return type(first)(**values)
