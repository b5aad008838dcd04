"""Typed run configuration: YAML files, dotted command-line overrides, and validation.

A config is seven fixed sections (`modality`, `student`, `teacher`, `data`, `objective`, `rollout`,
`train`). Every value is checked here, at the edge, so the core can trust it: an unknown key names the
closest valid one, a wrong type names the field and the type it wants. Each section validates itself
(its `validate` method); `validate` adds the rules that join sections.

The schema is defined once, on the dataclass fields:
- every field says what a resumed run may do with it (`field(metadata={"resume": ...})`, see `RESUME_ROLES`);
  `resume_keys(role)` derives the key sets the run directory checks a resume against;
- the rollout and the teacher share one engine section (`EngineSettings`), written flat as today
  (`rollout.engine`, `teacher.url`, ...);
- a modality's own keys (the VLM's `student.trainable: lm_only`, the image teacher's `cfg_scale`, its
  `data.judge`) are declared and checked by the modality, through `register_modality_options`.
"""

from __future__ import annotations

import dataclasses
import difflib
import socket
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import yaml

from mmopd.losses import available_divergences
from mmopd.step.objective_table import DISTRIBUTION, KINDS, TABLE, estimators_of, needs_teacher, scores_teacher
from mmopd.step.rewards import resolve_reward


class ConfigError(ValueError):
    """A config that cannot run, with a message that says what to change."""


DTYPES = ("auto", "float32", "bfloat16", "float16")
OBJECTIVES = KINDS
SAMPLED_KLS = ("k1", "k3")  # objective.sampled_kl (mmopd.losses.sampled.Shaping)
BASELINES = ("none", "loo", "batch")
REWARD_BASELINES = ("group", "none")  # objective.reward_baseline: the mean reward of the prompt's samples, or 0
FUSED = ("auto", "always", "never")
ESTIMATORS = ("full", "sampled")
TRAINABLE = ("full", "lora")  # every modality's student.trainable modes; a modality may add its own
ENGINES = ("hf", "vllm")  # who samples (rollout.engine) or scores (teacher.engine)
SHARDING = ("none", "fsdp")

# what a resumed run may do with a key: RUN keys define the run (a change is refused unless listed in
# train.resume_changes); SAFE keys (its length, evaluation, logging) may change; LAYOUT keys (how the global batch is
# laid out over processes and micro-batches, how the models are placed) may change when the trainer can check that
# the global batch stays (checkpoints record it as "global_batch"); FIXED keys the checkpoint's weights decide
RUN, SAFE, LAYOUT, FIXED = "run", "safe", "layout", "fixed"
RESUME_ROLES = (RUN, SAFE, LAYOUT, FIXED)


def _key(role: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    return field(default=default, default_factory=factory, metadata={"resume": role})


def run_key(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A run-defining key."""
    return _key(RUN, default, factory)


def safe_key(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A key a resumed run may change."""
    return _key(SAFE, default, factory)


def layout_key(default: Any = dataclasses.MISSING) -> Any:
    """A key of the batch layout or model placement: a resume may change it when the global batch stays."""
    return _key(LAYOUT, default)


def fixed_key(default: Any = dataclasses.MISSING) -> Any:
    """A key the checkpoint's weights decide: a resume cannot change it."""
    return _key(FIXED, default)


def _choice(name: str, value: str, options: Collection[str]) -> None:
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} is {value!r}, which is not one of {', '.join(options)}{hint}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _unit(name: str, value: float, closed: bool = True) -> None:
    """`value` lies in [0, 1] (`closed`) or in (0, 1]."""
    if not (0.0 <= value <= 1.0 if closed else 0.0 < value <= 1.0):
        raise ConfigError(f"{name} must lie in {'[0, 1]' if closed else '(0, 1]'}, got {value}")


@dataclass
class StudentConfig:
    path: str = fixed_key("")
    dtype: str = run_key("auto")
    trainable: str = fixed_key("full")  # full | lora, or a mode the modality adds (vlm: lm_only)
    lora_rank: int = fixed_key(16)  # used by trainable: lora
    lora_alpha: float = fixed_key(32.0)
    gradient_checkpointing: bool = run_key(False)

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("student.path is required: a local model directory (or hub id)")
        _choice("student.dtype", self.dtype, DTYPES)
        _positive("student.lora_rank", self.lora_rank)
        _positive("student.lora_alpha", self.lora_alpha)


@dataclass
class EngineSettings:
    """Who runs one side's model, shared by `rollout` and `teacher` and written flat in either (`rollout.engine`,
    `teacher.url`): hf (in this process) | vllm (a vllm.LLM colocated here, or a `vllm serve` at url)."""

    engine: str = run_key("hf")
    url: str = run_key("")  # vllm: the server's URL (empty: a vllm.LLM in this process)
    gpu_memory_utilization: float = run_key(0.3)  # vllm colocated: its share of the GPU beside the trainer
    timeout: float = run_key(120.0)  # vllm served: seconds per request before a retry
    retries: int = run_key(3)  # vllm served: retries with backoff before the run stops naming the URL

    # the section's name, what its engine does, and an example server, for the messages
    _section, _does, _use, _example = "", "runs", "run with", "http://127.0.0.1:8000"

    def validate_engine(self, where: str) -> None:
        """The engine is a known one, and a url goes with engine vllm."""
        s = self._section
        _choice(f"{where}engine", self.engine, ENGINES)
        if self.url and self.engine != "vllm":
            raise ConfigError(f"{s}.url is set, but {s}.engine={self.engine} {self._does} in-process; set "
                              f"{s}.engine=vllm to {self._use} that server, or clear {s}.url")

    def validate_vllm(self) -> None:
        """What a vLLM engine (served at url, or colocated) needs: an http(s) URL, a GPU share, timeouts."""
        s = self._section
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{s}.url={self.url!r} must be an http(s):// URL, e.g. {self._example}")
        _unit(f"{s}.gpu_memory_utilization", self.gpu_memory_utilization, closed=False)
        _positive(f"{s}.timeout", self.timeout)
        _positive(f"{s}.retries", self.retries, allow_zero=True)


@dataclass
class TeacherConfig(EngineSettings):
    name: str = run_key("")  # several teachers (`teacher:` a list): what records name in their data.teacher_field
    path: str = run_key("")
    dtype: str = run_key("auto")
    cfg_scale: float = run_key(1.0)  # a modality's option: classifier-free guidance (image_tokens)
    top_k: int = run_key(0)  # full estimator: keep only the teacher's top-k logits per token (0 keeps all)
    tail: bool = run_key(False)  # top_k: the rest of the teacher's mass as one more class (a vLLM teacher sends it)
    sharding: str = layout_key("none")  # none (a full copy per process) | fsdp (sharded over the processes, FSDP2)
    # engine: who scores: hf | vllm (prompt_logprobs; served: `vllm serve` without LoRA, --max-logprobs >= top_k;
    # the full distribution: served as a pooling model, its last hidden states for the head read from path)

    _section, _does, _use, _example = "teacher", "scores", "score with", "http://127.0.0.1:8001"

    def validate(self, where: str = "teacher.") -> None:
        """`where` names the teacher in messages: `teacher.`, or `teacher 'name': ` among several."""
        self.validate_engine(where)
        _choice(f"{where}dtype", self.dtype, DTYPES)
        if self.tail and not self.top_k:
            raise ConfigError(f"{where}tail adds a tail class to the teacher's top-k; set {where}top_k: K as well, "
                              f"or {where}tail: false for the full distribution")
        _choice("teacher.sharding", self.sharding, SHARDING)
        _positive("teacher.top_k", self.top_k, allow_zero=True)

    def validate_scoring(self, objective: ObjectiveConfig) -> None:
        """A vLLM teacher (served or colocated) returns temperature-1 log-probs of given ids (or its top-k), and a
        served one its last hidden states (the full distribution, at any temperature): refuse what needs more."""
        if self.engine != "vllm" or not scores_teacher(objective.kind, objective.estimator, objective.kl_weight):
            return
        if self.sharding != "none":
            raise ConfigError(f"teacher.sharding={self.sharding} shards an in-process teacher, but teacher.engine=vllm "
                              "holds the teacher's weights in its engine; set teacher.sharding=none or "
                              "teacher.engine=hf")
        self.validate_vllm()
        hidden = TABLE[(objective.kind, objective.estimator)].teacher == DISTRIBUTION and not self.top_k
        if hidden and not self.url:
            raise ConfigError(f"objective.kind={objective.kind} with estimator={objective.estimator} needs the "
                              "teacher's full distribution, which a colocated vLLM teacher cannot send; serve it as a "
                              "pooling model and set teacher.url (its last hidden states), or set teacher.top_k: K "
                              "(its top-k plus a tail class), objective.estimator: sampled, or teacher.engine: hf")
        if objective.temperature != 1.0 and not hidden:
            raise ConfigError(f"objective.temperature={objective.temperature}, but a vLLM teacher's log-probs are at "
                              "temperature 1 and one log-prob (or a top-k) cannot be rescaled exactly; set "
                              "objective.temperature=1 or teacher.engine=hf")
        if self.cfg_scale != 1.0:
            raise ConfigError(f"teacher.cfg_scale={self.cfg_scale}: a guided teacher mixes the full logits of its "
                              "conditional and unconditional branches, which a vLLM teacher cannot send; set "
                              "teacher.cfg_scale=1 or teacher.engine=hf")


@dataclass
class DataConfig:
    train: str = run_key("")
    eval: str = safe_key("")
    skip_bad: bool = run_key(False)
    eval_limit: int = safe_key(0)  # 0 evaluates every eval record
    judge: str = safe_key("")  # a modality's option: the scoring model its metric needs (image_tokens: a classifier)
    split: str = run_key("train")  # the split of data.train when it is a hub id or a save_to_disk folder of splits
    eval_split: str = run_key("test")  # the split of data.eval, likewise
    subset: str = run_key("")  # a hub dataset's configuration (its subset), if it has several
    fields: dict[str, str] = run_key(factory=dict)  # record field -> the set's column, e.g. {prompt: question}
    teacher_field: str = run_key("teacher")  # several teachers: the record field naming each record's teacher
    # a privileged teacher (mmopd/data/privileged.py): the record field holding the prompt only the teacher reads
    teacher_prompt_field: str = run_key("teacher_prompt")

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("data.train is required: a JSONL, JSON, parquet or CSV file, a save_to_disk folder or a "
                              "hub id")
        _positive("data.eval_limit", self.eval_limit, allow_zero=True)


@dataclass
class ObjectiveConfig:
    kind: str = run_key("on_policy")
    divergence: str = run_key("reverse_kl")
    estimator: str = run_key("full")
    beta: float = run_key(0.5)
    lmbda: float = run_key(1.0)
    sft_weight: float = run_key(0.0)
    temperature: float = run_key(1.0)  # divides both models' logits inside the divergence
    fused: str = run_key("auto")  # divergences from hidden states and LM heads: auto | always | never
    sampled_kl: str = run_key("k1")  # sampled: k1 (log p_S − log p_T) | k3 (verl's low_var_kl; the forward KL's grad)
    # sampled, k1: a per-position leave-one-out mean of k, unbiased: none | loo (the prompt's samples) |
    # batch (all rows)
    baseline: str = run_key("none")
    advantage_clip: float = run_key(0.0)  # sampled, k1: clip the log-ratio to ±C (biased; 0: no clip)
    # a task reward (mmopd/step/rewards.py): a built-in (exact_match, judge) or module:function,
    # fn(records, responses) -> list[float]; empty: none. Per token A_t = −kl_weight·k_t + reward_weight·(R − b)
    # (mmopd/losses/sampled.py)
    reward: str = run_key("")
    reward_weight: float = run_key(0.0)  # 0: the reward is only logged (reward/mean, ...), the loss is pure OPD
    kl_weight: float = run_key(1.0)  # the KL term's weight; 0 (on_policy, with a reward): plain RL, no teacher
    reward_baseline: str = run_key("group")  # group: b = the mean reward of the prompt's samples | none: b = 0
    reward_std: bool = run_key(False)  # divide R − b by the std of the prompt's rewards (GRPO)

    def validate(self) -> None:
        _choice("objective.kind", self.kind, OBJECTIVES)
        _choice("objective.estimator", self.estimator, ESTIMATORS)
        if (self.kind, self.estimator) not in TABLE:
            raise ConfigError(f"objective.estimator={self.estimator} does not apply to objective.kind={self.kind}; "
                              f"use {' or '.join(estimators_of(self.kind))} (the sampled estimator is for on_policy "
                              "only)")
        _choice("objective.divergence", self.divergence, available_divergences())
        _choice("objective.fused", self.fused, FUSED)
        self._validate_shaping()
        if self.estimator == "sampled" and self.divergence != "reverse_kl":
            raise ConfigError("objective.estimator=sampled estimates the reverse KL only; "
                              f"set objective.divergence=reverse_kl (got {self.divergence})")
        _unit("objective.beta", self.beta)
        _unit("objective.lmbda", self.lmbda)
        _positive("objective.sft_weight", self.sft_weight, allow_zero=True)
        _positive("objective.temperature", self.temperature)
        self._validate_reward()

    def _validate_reward(self) -> None:
        """objective.reward names a reward that resolves; its weights, baseline and the KL term's weight agree."""
        _positive("objective.reward_weight", self.reward_weight, allow_zero=True)
        _positive("objective.kl_weight", self.kl_weight, allow_zero=True)
        _choice("objective.reward_baseline", self.reward_baseline, REWARD_BASELINES)
        if self.reward:
            try:
                resolve_reward(self.reward)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if self.kind != "on_policy":
                raise ConfigError(f"objective.reward scores the student's own samples: it needs objective.kind="
                                  f"on_policy (got {self.kind}); clear objective.reward for {self.kind}")
        elif self.reward_weight > 0:
            raise ConfigError(f"objective.reward_weight={self.reward_weight} weighs a task reward, but "
                              "objective.reward is empty; name one (exact_match, judge, or module:function) or set "
                              "reward_weight=0")
        if self.reward_std and self.reward_baseline != "group":
            raise ConfigError("objective.reward_std divides R − b by the std of the prompt's rewards; it needs "
                              "objective.reward_baseline=group")
        if self.kl_weight != 1 and self.kind != "on_policy":
            raise ConfigError(f"objective.kl_weight weighs the KL term against a task reward, on_policy only; set "
                              f"kl_weight=1 for objective.kind={self.kind}")
        if self.kl_weight == 0 and self.reward_weight == 0:
            raise ConfigError("objective.kl_weight=0 turns the KL term off, which leaves nothing to train; set "
                              "objective.reward and objective.reward_weight > 0 (plain on-policy RL), or kl_weight > 0")
        shaped = [name for name, value, plain in (("sampled_kl", self.sampled_kl, "k1"), ("baseline", self.baseline,
                  "none"), ("advantage_clip", self.advantage_clip, 0.0)) if value != plain]
        if self.kl_weight == 0 and shaped:
            raise ConfigError(f"objective.{shaped[0]} shapes the KL term, which objective.kl_weight=0 turns off; "
                              "leave it at its default or set kl_weight > 0")

    def _validate_shaping(self) -> None:
        """objective.sampled_kl, .baseline and .advantage_clip shape the sampled estimator only, one way at a time."""
        _choice("objective.sampled_kl", self.sampled_kl, SAMPLED_KLS)
        _choice("objective.baseline", self.baseline, BASELINES)
        _positive("objective.advantage_clip", self.advantage_clip, allow_zero=True)
        shaped = [f"{name}={value}" for name, value, plain in (("sampled_kl", self.sampled_kl, "k1"),
                  ("baseline", self.baseline, "none"), ("advantage_clip", self.advantage_clip, 0.0)) if value != plain]
        if shaped and self.estimator != "sampled":
            raise ConfigError(f"objective.{shaped[0]} shapes the sampled estimator's coefficient; set "
                              "objective.estimator=sampled or leave it at its default")
        if self.sampled_kl == "k3" and len(shaped) > 1:
            raise ConfigError("objective.sampled_kl=k3 is a loss differentiated as it stands (verl's low_var_kl); "
                              "objective.baseline and objective.advantage_clip shape k1's coefficient. Use one or the "
                              "other")


def _this_machine(host: str) -> bool:
    """Whether a URL's host is this machine by its name: a loopback address, or the machine's own host name."""
    name = socket.gethostname()
    return host in ("localhost", "::1", "0.0.0.0", name, name.split(".")[0]) or host.startswith("127.")


@dataclass
class RolloutConfig(EngineSettings):
    max_new_tokens: int = run_key(64)
    temperature: float = run_key(1.0)
    top_p: float = run_key(1.0)
    top_k: int = run_key(0)
    samples_per_prompt: int = run_key(1)
    # engine: who samples: hf (the in-process decode loop) | vllm (colocated, or served at url)
    sleep: bool = run_key(False)  # vllm colocated: free its weights and KV cache between rollouts
    sync_dir: str = run_key("")  # vllm: where the trainer writes the weights the engine reloads (empty: /dev/shm)
    tis_cap: float = run_key(0.0)  # vllm, sampled estimator: truncated importance-sampling cap (0: no correction)

    _section, _does, _use, _example = "rollout", "samples", "sample from", "http://127.0.0.1:8000"

    def validate(self) -> None:
        self.validate_engine("rollout.")
        self.validate_vllm()
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if self.url and not self.sync_dir and not _this_machine(host):
            raise ConfigError(f"rollout.url={self.url} names another machine, which loads the student's weights at "
                              "every sync from rollout.sync_dir, by default this machine's /dev/shm: set "
                              "rollout.sync_dir to a folder that machine reads at the same path (a shared filesystem)")
        _positive("rollout.tis_cap", self.tis_cap, allow_zero=True)
        _unit("rollout.top_p", self.top_p)
        if self.top_p == 0.0:
            raise ConfigError("rollout.top_p must be > 0 (1.0 disables nucleus sampling)")
        _positive("rollout.temperature", self.temperature, allow_zero=True)
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        _positive("rollout.samples_per_prompt", self.samples_per_prompt)
        _positive("rollout.top_k", self.top_k, allow_zero=True)


@dataclass
class TrainConfig:
    steps: int = safe_key(200)
    batch_size: int = layout_key(8)
    grad_accum: int = layout_key(1)
    lr: float = run_key(1.0e-4)
    weight_decay: float = run_key(0.0)
    warmup: int = run_key(10)
    seed: int = run_key(0)
    out_dir: str = safe_key("runs/x")
    save_every: int = safe_key(50)
    keep_last: int = safe_key(0)  # 0 keeps every checkpoint
    eval_every: int = safe_key(50)
    eval_batch_size: int = safe_key(64)
    log_every: int = safe_key(1)
    max_grad_norm: float = run_key(1.0)
    resume: str = safe_key("auto")  # auto | never
    existing: str = safe_key("refuse")  # resume: never in a directory holding a run: refuse | move_aside (NAME.old-N)
    resume_changes: list[str] = safe_key(factory=list)  # run-defining keys a resume may change, e.g. [train.lr]
    report_to: list[str] = safe_key(factory=list)
    progress: bool = safe_key(True)
    sharding: str = layout_key("none")  # the student: none (data parallel, DDP) | fsdp (sharded over the processes)
    fsdp_cpu_offload: bool = layout_key(False)  # sharding: fsdp: the student's shards, grads and optimizer on the CPU
    # several processes: how long one waits for the others at a collective (a gradient reduce, a barrier, a
    # checkpoint's gather) before the run stops; above the longest work one rank does alone (rank 0's eval under DDP,
    # a checkpoint write)
    collective_timeout: float = safe_key(1800.0)
    # sample health (mmopd/step/health.py): warn once when the student's samples collapse
    health_min_entropy: float = run_key(0.5)  # nats of the batch's sampled tokens; below it: collapsing (0: off)
    health_max_repeat: float = run_key(0.5)  # share of tokens that repeat an earlier 3-gram of their response (1: off)
    health_max_length: float = run_key(0.95)  # mean length / rollout.max_new_tokens, having started below it (1: off)
    health_min_entropy_ratio: float = run_key(0.5)  # of the teacher's samples' entropy (an in-process teacher; 0: off)
    eval_kl_prompts: int = run_key(8)  # eval prompts for the forward and reverse KL to an in-process teacher (0: off)

    def validate(self) -> None:
        _choice("train.resume", self.resume, ("auto", "never"))
        _choice("train.sharding", self.sharding, SHARDING)
        if self.fsdp_cpu_offload and self.sharding != "fsdp":
            raise ConfigError("train.fsdp_cpu_offload offloads a sharded student; set train.sharding=fsdp or clear it")
        _choice("train.existing", self.existing, ("refuse", "move_aside"))
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir is empty; name the run's output directory, e.g. train.out_dir=runs/x")
        known = sorted(config_keys())
        for key in self.resume_changes:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"train.resume_changes names {key!r}, which is no config key{hint}")
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("warmup", "save_every", "keep_last", "eval_every", "seed"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _positive("train.lr", self.lr)
        _positive("train.collective_timeout", self.collective_timeout)
        for name in ("weight_decay", "max_grad_norm", "health_min_entropy", "eval_kl_prompts"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("health_max_repeat", "health_max_length"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"train.{name} must lie in (0, 1] (1 turns the check off), got {value}")
        if not 0.0 <= self.health_min_entropy_ratio < 1.0:
            raise ConfigError("train.health_min_entropy_ratio is a fraction of the teacher's sample entropy and must "
                              f"lie in [0, 1) (0 turns the check off), got {self.health_min_entropy_ratio}")
        for tracker in self.report_to:
            _choice("train.report_to", tracker, ("tensorboard", "wandb"))


@dataclass
class Config:
    modality: str = fixed_key("text")
    student: StudentConfig = run_key(factory=StudentConfig)
    teacher: TeacherConfig = run_key(factory=TeacherConfig)
    data: DataConfig = run_key(factory=DataConfig)
    objective: ObjectiveConfig = run_key(factory=ObjectiveConfig)
    rollout: RolloutConfig = run_key(factory=RolloutConfig)
    train: TrainConfig = run_key(factory=TrainConfig)
    teachers: list[TeacherConfig] = run_key(factory=list)  # `teacher:` a list; `teacher` is then the first

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML writes it: `teacher` a list when there are several teachers."""
        raw = dataclasses.asdict(self)
        teachers = raw.pop("teachers")
        if teachers:
            raw["teacher"] = teachers
        return raw


def _leaves(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every key of the schema below `cls`, dotted (`train.lr`), with its field; a list of sections (`teachers`,
    the list form of `teacher`) is no key of its own."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found.update(_leaves(hint, f"{prefix}{f.name}."))
        elif not any(dataclasses.is_dataclass(arg) for arg in typing.get_args(hint)):
            found[f"{prefix}{f.name}"] = f
    return found


def config_keys() -> frozenset[str]:
    """Every config key, dotted: `modality`, `student.path`, ..., `train.eval_kl_prompts`."""
    return frozenset(_leaves(Config))


def resume_keys(role: str) -> frozenset[str]:
    """The keys whose fields carry resume role `role` (one of RESUME_ROLES)."""
    if role not in RESUME_ROLES:
        raise ValueError(f"resume role {role!r} is not one of {', '.join(RESUME_ROLES)}")
    return frozenset(key for key, f in _leaves(Config).items() if f.metadata["resume"] == role)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply `a.b=value` overrides, and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config path {path} is a directory; pass the YAML file (e.g. {path / 'config.yaml'})")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start})") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
    else:
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=50")
            _set_dotted(raw, key, yaml.safe_load(value) if value.strip() else "")
    config = _build_config(raw)
    validate(config)
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain nested dict (e.g. a saved config.yaml)."""
    config = _build_config(raw)
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _build_config(raw: dict[str, Any]) -> Config:
    """A Config from raw sections; `teacher:` may be a list of teachers (each a mapping with a name)."""
    if "teachers" in raw:
        raise ConfigError("unknown config key 'teachers'; several teachers go under 'teacher' as a list")
    teachers = raw.get("teacher")
    if not isinstance(teachers, list):
        return _build(Config, raw, "")
    if not teachers:
        raise ConfigError("teacher is an empty list; give one teacher mapping, or a list of named teachers")
    built = [_build(TeacherConfig, t, f"teacher[{i}]") for i, t in enumerate(teachers)]
    config = _build(Config, {k: v for k, v in raw.items() if k != "teacher"}, "")
    config.teacher, config.teachers = built[0], built
    return config


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint} (valid: {', '.join(fields)})")
        values[key] = _coerce(hints[key], value, name)
    return cls(**values)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, name)
    origin = typing.get_origin(hint)
    if origin in (list, typing.List):
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        key, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {_coerce(key, k, f"{name} key {k!r}"): _coerce(item, v, f"{name}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in configs")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported config type {hint!r}")


NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
AGREE = ("cfg_scale", "top_k", "sharding")  # what one step's teacher scores share: per-teacher values would differ


def _check_teachers(teachers: list[TeacherConfig], data: DataConfig, objective: ObjectiveConfig) -> None:
    """Several teachers by route: named uniquely, each valid as a single one, handing over one kind of score."""
    for i, t in enumerate(teachers):
        if not t.name:
            raise ConfigError(f"teacher[{i}] has no name; with several teachers each needs one (records pick theirs "
                              f"by data.teacher_field: {data.teacher_field})")
        if not set(t.name) <= NAME_CHARACTERS:
            raise ConfigError(f"teacher[{i}].name={t.name!r} may hold letters, digits, '_', '.' and '-' only "
                              "(it names the teacher's metrics)")
    names = [t.name for t in teachers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"teacher names must differ; {', '.join(map(repr, duplicates))} appears more than once")
    first = teachers[0]
    for t in teachers[1:]:
        for key in AGREE:
            if getattr(t, key) != getattr(first, key):
                raise ConfigError(f"teacher {t.name!r} has {key}={getattr(t, key)} and teacher {first.name!r} "
                                  f"{key}={getattr(first, key)}; several teachers must agree on {', '.join(AGREE)}")
        if (t.tail or t.engine == "vllm") != (first.tail or first.engine == "vllm") and first.top_k:
            raise ConfigError(f"teachers {first.name!r} and {t.name!r} disagree on the tail class: a served teacher "
                              "always sends one, so set tail: true on every in-process teacher beside it")
    if objective.kind == "seq_kd":
        raise ConfigError("objective.kind=seq_kd samples its responses from one teacher; several teachers route "
                          "the scoring of responses only. Give one teacher, or another objective.kind")
    if first.sharding != "none":
        raise ConfigError("teacher.sharding=fsdp shards one teacher; with several teachers set sharding: none")


def _check_teacher_side(teachers: list[TeacherConfig], routed: bool, objective: ObjectiveConfig,
                        data: DataConfig) -> None:
    """Each teacher on its own (`routed`: several by name, `teacher:` a list), then what the objective asks of it
    (a path, what a vLLM teacher can send)."""
    for t in teachers:
        where = f"teacher {t.name!r}: " if routed else "teacher."
        if needs_teacher(objective.kind, objective.estimator, objective.kl_weight) and not t.path:
            raise ConfigError(f"{where}path is required for objective.kind={objective.kind}")
        t.validate(where)
    if routed:
        _check_teachers(teachers, data, objective)
    for t in teachers:
        t.validate_scoring(objective)
    if teachers[0].top_k and objective.estimator == "sampled":
        raise ConfigError("teacher.top_k keeps the teacher's top-k logits for objective.estimator=full; the sampled "
                          "estimator needs only each sampled token's log-prob. Set teacher.top_k=0")


def _check_student_side(s: StudentConfig, r: RolloutConfig, t: TrainConfig, obj: ObjectiveConfig) -> None:
    """How the student samples, trains and is placed: what one section allows and another rules out."""
    if r.tis_cap and obj.estimator != "sampled":
        raise ConfigError("rollout.tis_cap corrects the sampled estimator for the engine's numerics; the full "
                          "estimator does not use behaviour log-probs. Set rollout.tis_cap=0 or "
                          "objective.estimator=sampled")
    if obj.reward_weight > 0 and obj.reward_baseline == "group" and r.samples_per_prompt < 2:
        raise ConfigError("objective.reward_baseline=group subtracts the mean reward of a prompt's samples; set "
                          f"rollout.samples_per_prompt >= 2 (got {r.samples_per_prompt}), or reward_baseline=none")
    if obj.baseline == "loo" and r.samples_per_prompt < 2:
        raise ConfigError("objective.baseline=loo averages a prompt's other samples; set rollout.samples_per_prompt "
                          f">= 2 (got {r.samples_per_prompt})")
    if r.engine == "vllm" and s.trainable == "lora" and s.lora_rank > 512:
        raise ConfigError(f"student.lora_rank={s.lora_rank}: vLLM serves LoRA ranks up to 512; lower it "
                          "or set rollout.engine=hf")
    if t.sharding == "fsdp" and s.trainable == "lora" and r.engine == "vllm":
        raise ConfigError("student.trainable=lora with train.sharding=fsdp samples with rollout.engine=hf only (the "
                          "vLLM adapter sync does not gather sharded adapters); use rollout.engine=hf, or "
                          "train.sharding=none for LoRA through vLLM")
    if t.sharding == "fsdp" and r.engine == "vllm" and not r.url:
        raise ConfigError("rollout.engine=vllm with train.sharding=fsdp samples from a served engine only: set "
                          "rollout.url (a colocated engine on every rank would need the full weights on every "
                          "rank, which the sharded sync gathers onto rank 0), or use rollout.engine=hf")


def validate(config: Config) -> None:
    """Check values that types alone cannot: each section its own choices, ranges and required paths, then the
    rules that join sections. A modality's own keys are checked by the modality (`check_modality_options`)."""
    config.student.validate()
    config.objective.validate()
    _check_teacher_side(config.teachers or [config.teacher], bool(config.teachers), config.objective, config.data)
    for section in (config.rollout, config.data, config.train):
        section.validate()
    _check_student_side(config.student, config.rollout, config.train, config.objective)


@dataclass(frozen=True)
class ModalityOptions:
    """What a modality adds to the schema, and how it checks it. Its keys sit in the sections users write them in
    (`student.trainable: lm_only`, `teacher.cfg_scale`, `data.judge`); the modality registers this at import."""

    trainable: tuple[str, ...] = ()  # student.trainable modes beyond full and lora (vlm: lm_only)
    guidance: bool = False  # whether a teacher can be guided (teacher.cfg_scale != 1, classifier-free guidance)
    check: Callable[[Config], None] | None = None  # the modality's own checks of its keys (a ConfigError each)


_MODALITY_OPTIONS: dict[str, ModalityOptions] = {}


def register_modality_options(name: str, options: ModalityOptions) -> None:
    """Declare modality `name`'s options; a modality calls this when it is imported."""
    _MODALITY_OPTIONS[name] = options


def modality_options(name: str) -> ModalityOptions:
    """The options modality `name` declared (none beyond the core's where it declared nothing)."""
    return _MODALITY_OPTIONS.get(name, ModalityOptions())


def check_modality_options(config: Config, training: bool) -> ModalityOptions:
    """The modality's checks of its own keys, once it is loaded (the Session's first move): its trainable modes
    (when `training`) and its `check`."""
    options = modality_options(config.modality)
    modes = TRAINABLE + options.trainable
    if training and config.student.trainable not in modes:
        listed = f"{', '.join(modes[:-1])} or {modes[-1]}"
        close = difflib.get_close_matches(config.student.trainable, modes, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"student.trainable={config.student.trainable} is not supported by the {config.modality} "
                          f"adapter; use {listed}{hint}")
    if options.check is not None:
        options.check(config)
    return options
