"""Rollout engines and teacher scorers, by name (`rollout.engine`, `teacher.engine`); see `base` for the
protocols and `hf` for the in-process engines."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mmopd.config import Config, ConfigError
from mmopd.engines.base import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, RolloutEngine, TeacherNeed, TeacherScorer
from mmopd.engines.hf import HFRollout, HFTeacher, model_scores, rollout
from mmopd.engines.vllm import (Colocated, EngineError, Served, VLLMRollout, VLLMTeacher, default_sync_dir,
                                remove_sync_dir, write_engine_checkpoint)
from mmopd.engines.vllm.families import engine_key as vllm_engine_key
from mmopd.engines.vllm.families import vllm_unsupported
from mmopd.engines.vllm.head import load_head
from mmopd.engines.vllm.identity import check_served_model
from mmopd.engines.vllm.serve import engine_dtype
from mmopd.models.adapter import ModalityAdapter, PolicySide, fused_unsupported
from mmopd.models.hf import context_length, text_config
from mmopd.registry import Registry
from mmopd.step.batch import TokenSpace
from mmopd.step.objective_table import row_of

log = logging.getLogger("mmopd")

__all__ = ["RolloutEngine", "TeacherScorer", "TeacherNeed", "DISTRIBUTION", "TOP_K", "TOKEN_LOGPROBS",
           "HFRollout", "HFTeacher", "model_scores", "rollout", "rollout_engine", "teacher_scorer",
           "ROLLOUT_ENGINES", "TEACHER_ENGINES",
           "EngineError", "VLLMRollout", "VLLMTeacher"]


# (config, the side that samples, path, writer) -> the engine that samples from side.model
RolloutFactory = Callable[[Config, PolicySide, str, bool], RolloutEngine]
# (config, the teacher's side, fused) -> the engine that scores with the teacher
TeacherFactory = Callable[[Config, PolicySide, bool], TeacherScorer]
ROLLOUT_ENGINES: Registry[RolloutFactory] = Registry("rollout.engine", ConfigError)
TEACHER_ENGINES: Registry[TeacherFactory] = Registry("teacher.engine", ConfigError)


def rollout_engine(engine: str, config: Config, side: PolicySide, path: str = "", writer: bool = True) -> RolloutEngine:
    """The engine that samples from `side.model` (the student, or seq_kd's teacher); `path` is where the model was
    loaded from (a colocated vLLM loads it too), `writer` whether this process sends the weights at sync."""
    return ROLLOUT_ENGINES[engine](config, side, path, writer)


@ROLLOUT_ENGINES.register("hf")
def hf_rollout(config: Config, side: PolicySide, path: str, writer: bool) -> RolloutEngine:
    """The in-process decode loop."""
    return HFRollout(side, config.rollout.max_new_tokens)


@ROLLOUT_ENGINES.register("vllm")
def vllm_rollout(config: Config, side: PolicySide, path: str, writer: bool) -> RolloutEngine:
    """A `vllm serve` at rollout.url, or without a url a `vllm.LLM` in this process that the trainer syncs."""
    r = config.rollout
    adapter, model, processor = side.adapter, side.model, side.processor
    why = vllm_unsupported(model, served=bool(r.url), pictures=adapter.prompt_pictures) or \
        _cpu_attention_unsupported(model, bool(r.url), next(model.parameters()).is_cuda)
    if why is not None:
        raise ConfigError(f"rollout.engine=vllm cannot sample from this student: {why}; use rollout.engine=hf")
    lora = config.student.trainable == "lora"
    sync_dir = Path(r.sync_dir) if r.sync_dir else default_sync_dir()
    sync_dir.mkdir(parents=True, exist_ok=True)
    engine_key = vllm_engine_key(model)
    try:
        if r.url:
            transport: Any = Served(r.url, r.timeout, r.retries)
            if not lora:
                transport.check_untied()
        else:  # a full student's engine starts from an untied copy in vLLM's key layout; a LoRA one from the base
            start = path if lora else write_engine_checkpoint(model, sync_dir / "start", engine_key, processor)
            dtype = engine_dtype(config.student.dtype, next(model.parameters()).is_cuda)
            transport = Colocated(str(start), dtype, context_length(model), r.gpu_memory_utilization, r.sleep,
                                  config.student.lora_rank if lora else 0)
    except BaseException:
        remove_sync_dir(sync_dir, owned=not r.sync_dir)
        raise
    return VLLMRollout(transport, side.space, side.eos_ids, side.pad_id, r.max_new_tokens, sync_dir, lora, engine_key,
                       writer, owns_sync_dir=not r.sync_dir)


# head sizes vLLM's CPU attention backend supports (CPUAttentionBackend.get_supported_head_sizes, vLLM 0.32)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _cpu_attention_unsupported(model: nn.Module, served: bool, cuda: bool) -> str | None:
    """vLLM on a CPU refuses other head sizes after minutes of start-up; say so before anything starts."""
    if served or cuda:
        return None
    config = text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        return (f"its head_dim is {head_dim}, and vLLM's CPU attention supports head sizes "
                f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))} only")
    return None


def teacher_scorer(config: Config, side: PolicySide, fused: bool) -> TeacherScorer:
    """The engine that scores responses with the teacher (`side`: its model, processor, token space and EOS ids), by
    teacher.engine."""
    return TEACHER_ENGINES[config.teacher.engine](config, side, fused)


@TEACHER_ENGINES.register("hf")
def hf_teacher(config: Config, side: PolicySide, fused: bool) -> TeacherScorer:
    """The teacher's forward in this process."""
    return HFTeacher(side.adapter, side.model, side.space, fused)


@TEACHER_ENGINES.register("vllm")
def vllm_teacher(config: Config, side: PolicySide, fused: bool) -> TeacherScorer:
    """A `vllm serve` at teacher.url, or without a url a `vllm.LLM` in this process that loads teacher.path
    (`side.model` is then its weightless skeleton, `Session.teacher`)."""
    t = config.teacher
    adapter, model, space, eos_ids = side.adapter, side.model, side.space, side.eos_ids
    cuda = torch.cuda.is_available()
    why = vllm_unsupported(model, served=False) or _cpu_attention_unsupported(model, bool(t.url), cuda)
    if why is not None:
        raise ConfigError(f"teacher.engine=vllm cannot score with this teacher: {why}; use teacher.engine=hf")
    if row_of(config.objective.kind, config.objective.estimator).teacher == DISTRIBUTION and not t.top_k:
        return _hidden_state_teacher(config, adapter, model, space, fused, eos_ids)
    vocab = text_config(model).vocab_size
    if space.size < vocab:
        log.info("teacher.engine=vllm: the vLLM teacher's log-probs are over its %d-token vocabulary; the "
                 "in-process teacher renormalises over the %d actions (the same where it puts no mass outside)",
                 vocab, space.size)
    transport: Any = _served_teacher(config) if t.url else \
        Colocated(t.path, engine_dtype(t.dtype, cuda), None, t.gpu_memory_utilization, False, 0)
    return VLLMTeacher(transport, space, eos_ids)


def _served_teacher(config: Config) -> Served:
    """The transport to the teacher at teacher.url, which checks that its server serves teacher.path
    (`identity.check_served_model`) before its first score."""
    t = config.teacher
    return Served(t.url, t.timeout, t.retries, role="teacher",
                  check=partial(check_served_model, t.url.rstrip("/"), t.path, config.student.path))


def _hidden_state_teacher(config: Config, adapter: ModalityAdapter, model: nn.Module, space: TokenSpace,
                          fused: bool, eos_ids: list[int]) -> TeacherScorer:
    """A served teacher that sends its last hidden states, with its LM head read from teacher.path (the full
    distribution, exact)."""
    t = config.teacher
    why = fused_unsupported(adapter, model)
    if why is not None:
        raise ConfigError(f"teacher.engine=vllm sends the full distribution as the teacher's last hidden states, for "
                          f"the trainer's copy of its LM head, and this teacher's head cannot take them: {why}; set "
                          "teacher.top_k: K, objective.estimator: sampled, or teacher.engine: hf")
    head = load_head(t.path, model, getattr(torch, engine_dtype(t.dtype, torch.cuda.is_available())))
    return VLLMTeacher(_served_teacher(config), space, eos_ids, head, fused)

