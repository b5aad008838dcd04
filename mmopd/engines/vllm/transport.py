"""What a vLLM engine asks of its transport (served over HTTP in `served`, in this process in `colocated`), and
what the transports answer with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor


class EngineError(RuntimeError):
    """An inference engine that cannot be reached or answers wrongly, with what to check."""


@dataclass
class Completion:
    """One sampled response: its token ids (EOS included when it stopped there) and their log-probs."""

    token_ids: list[int]
    logprobs: list[float]


class Transport(Protocol):
    def generate(self, prompts: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[Completion]:
        """Sample one completion per prompt; `params` are vLLM SamplingParams fields per prompt."""
        ...

    def reload_weights(self, directory: Path) -> None: ...

    def load_lora(self, name: str, version: int, directory: Path) -> None: ...


Entries = list[dict[int, float] | None]  # per position: token id -> log-prob (None where nothing is scored)


class Scoring(Protocol):
    url: str  # where the engine is, for error messages

    def prompt_logprobs(self, requests: list[dict[str, Any]], k: int) -> list[Entries]:
        """Each request's log-prob of every given id (and its top k) per position; entry 0 is None."""
        ...

    def hidden_states(self, ids: list[list[int]]) -> list[Tensor]:
        """Each id list's last hidden states (what the LM head reads), flat float32: [len(ids[i]) * H] each."""
        ...
