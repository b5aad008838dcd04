"""Task rewards (`objective.reward`): a built-in by name, or a user's function by import path `module:function`,
resolved once at start; each response's reward, checked; what a step logs about them.

A user's function reads `fn(records: list[dict], responses: list[str]) -> list[float]`: the micro-batch's records
(a prompt's record once per sample, consecutive) and the responses decoded by the modality's adapter. A built-in
also gets the adapter, which does the scoring, so the core names no modality: `exact_match` and `judge` both score
each response alone with the adapter's own `score` (the rule evaluation uses), `exact_match` where that is accuracy
against the record's answer (text, vlm), `judge` where it is a classifier's verdict (image_tokens: the judge at
data.judge). A built-in that the run's adapter cannot give is refused at start (`refusal`). The rewards enter the
per-token advantage in `mmopd/losses/sampled.py` (`reward_advantage`).
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from mmopd.registry import Registry

UserReward = Callable[[list[dict], list[str]], list[float]]  # a user's `module:function`
Reward = Callable[[Any, list[dict], list[Any]], list[float]]  # (adapter, records, responses) -> one reward a response


class RewardError(RuntimeError):
    """A reward function that failed on a step's responses; the message names the record."""


@dataclass(frozen=True)
class Builtin:
    """A built-in reward: the function, whether it reads every record's dataset answer, and why an adapter cannot
    give it (None where it can)."""

    reward: Reward
    refusal: Callable[[Any], str | None]
    needs_answers: bool = False


REWARDS: Registry[Builtin] = Registry("objective.reward")  # the built-ins, by the name a config gives


def own_metric(adapter: Any, records: list[dict], responses: list[Any]) -> list[float]:
    """The adapter's `metric` as its `score` gives it for each response alone: 1 for a response the modality's own
    rule finds right, else 0 (text, vlm: the answer matches the record's; image_tokens: the judge sees the asked
    class in the picture)."""
    return [adapter.score([record], [response])[adapter.metric] for record, response in zip(records, responses)]


def _scores_accuracy(adapter: Any) -> str | None:
    if adapter.metric == "accuracy":
        return None
    instead = "judge (the judge's verdict) or a module:function" if adapter.judges else "a module:function"
    return (f"objective.reward=exact_match scores answers by the adapter's accuracy; the {adapter.name} adapter "
            f"scores {adapter.metric}. Give {instead} reward instead")


def _has_judge(adapter: Any) -> str | None:
    if adapter.judges:
        return None
    return (f"objective.reward=judge grades each response with the modality's judge (a classifier); the "
            f"{adapter.name} adapter has none (image_tokens has). Give exact_match or a module:function reward instead")


REWARDS.register("exact_match")(Builtin(own_metric, _scores_accuracy, needs_answers=True))
REWARDS.register("judge")(Builtin(own_metric, _has_judge))


def is_import_path(name: str) -> bool:
    return ":" in name


def import_reward(path: str) -> UserReward:
    """The function at `module:function`; a ValueError in one line where there is none, or it is not callable."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"objective.reward={path!r} must be a built-in ({', '.join(REWARDS)}) or module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an import path is user code: any failure to import it is the user's to fix
        raise ValueError(f"objective.reward={path!r}: cannot import {module_name!r} ({type(err).__name__}: "
                         f"{err})") from err
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"objective.reward={path!r}: {module_name!r} has no {attribute!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"objective.reward={path!r} is a {type(fn).__name__}, not a function "
                         "fn(records, responses) -> list[float]")
    return fn


def resolve_reward(name: str) -> tuple[Reward, bool]:
    """The reward `name` names as (adapter, records, responses) -> rewards, and whether it reads the records'
    answers. ValueError in one line for an unknown built-in or a bad import path."""
    if not is_import_path(name):
        builtin = REWARDS[name]
        return builtin.reward, builtin.needs_answers
    fn = import_reward(name)
    return (lambda adapter, records, responses: fn(records, responses)), False


def refusal(name: str, adapter: Any) -> str | None:
    """Why the run's adapter cannot give reward `name` (validated), in one line; None where it can (every import
    path: a user's function reads decoded responses)."""
    return None if is_import_path(name) else REWARDS[name].refusal(adapter)


def _where(records: list[dict], i: int) -> str:
    return f"record {records[i].get('_where', f'row {i} of the micro-batch')}"


def rewards_of(reward: Reward, name: str, adapter: Any, records: list[dict], responses: list[Any],
               device: torch.device) -> Tensor:
    """Each response's reward [B] float32, or a RewardError naming the record where the function raised, returned
    a value that is no finite number, or the wrong number of values."""
    try:
        values = reward(adapter, records, responses)
    except RewardError:
        raise
    except Exception as err:  # user code: find the record it fails on, one at a time
        raise RewardError(f"objective.reward {name!r} raised on {_failing(reward, adapter, records, responses)}: "
                          f"{type(err).__name__}: {err}") from err
    if isinstance(values, (list, tuple)):
        values = list(values)
    if not isinstance(values, list) or len(values) != len(records):
        got = f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
        raise RewardError(f"objective.reward {name!r} returned {got} for {len(records)} responses (records "
                          f"{records[0].get('_where', 'row 0')} ...); it must return one float per response")
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise RewardError(f"objective.reward {name!r} returned {value!r} for {_where(records, i)}, sample "
                              f"{i} of the micro-batch; a reward must be a finite number")
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


def _failing(reward: Reward, adapter: Any, records: list[dict], responses: list[Any]) -> str:
    """The first record the reward raises on alone, or the micro-batch's first where each alone passes."""
    for i in range(len(records)):
        try:
            reward(adapter, records[i:i + 1], responses[i:i + 1])
        except Exception:
            return f"{_where(records, i)} (response {str(responses[i])[:60]!r})"
    return f"the micro-batch from {_where(records, 0)} (each record alone passes)"


def reward_metrics(rewards: Tensor, group: int) -> dict[str, float]:
    """`reward/mean`, `reward/std` (over the micro-batch's responses) and `reward/all_equal_share`: the share of
    prompts (groups of `group` consecutive rows) whose samples all got the same reward. [B] -> metrics"""
    groups = rewards.view(-1, group)  # [P, G]
    all_equal = (groups == groups[:, :1]).all(1).float()  # [P]
    return {"reward/mean": rewards.mean().item(), "reward/std": rewards.std(unbiased=False).item(),
            "reward/all_equal_share": all_equal.mean().item()}


def reads_answers(name: str) -> bool:
    """Whether reward `name` (validated; empty: none) reads every record's dataset answer."""
    return bool(name) and not is_import_path(name) and REWARDS[name].needs_answers
