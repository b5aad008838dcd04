"""Rollout engines and teacher scorers, by name (`rollout.engine`, `teacher.engine`); see `base` for the
protocols and `hf` for the in-process engines."""

from __future__ import annotations

from typing import Any

from torch import nn

from mmopd.adapter import ModalityAdapter
from mmopd.batch import TokenSpace
from mmopd.config import Config, ConfigError
from mmopd.engines.base import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, RolloutEngine, TeacherNeed, TeacherScorer
from mmopd.engines.hf import HFRollout, HFTeacher, model_scores, rollout

__all__ = ["RolloutEngine", "TeacherScorer", "TeacherNeed", "DISTRIBUTION", "TOP_K", "TOKEN_LOGPROBS",
           "HFRollout", "HFTeacher", "model_scores", "rollout", "rollout_engine", "teacher_scorer"]


def rollout_engine(engine: str, config: Config, adapter: ModalityAdapter, model: nn.Module, processor: Any,
                   space: TokenSpace, eos_ids: list[int], pad_id: int) -> RolloutEngine:
    """The engine that samples from `model` (the student, or seq_kd's teacher)."""
    if engine == "hf":
        return HFRollout(adapter, model, space, eos_ids, pad_id, config.rollout.max_new_tokens)
    raise ConfigError(f"rollout.engine={engine!r} is not available")


def teacher_scorer(config: Config, adapter: ModalityAdapter, model: nn.Module, processor: Any, space: TokenSpace,
                   fused: bool) -> TeacherScorer:
    """The engine that scores responses with the teacher."""
    if config.teacher.engine == "hf":
        return HFTeacher(adapter, model, space, fused)
    raise ConfigError(f"teacher.engine={config.teacher.engine!r} is not available")
