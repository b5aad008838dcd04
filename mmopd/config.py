"""Typed run configuration: YAML files, dotted command-line overrides, and validation.

A config is seven fixed sections (`modality`, `student`, `teacher`, `data`, `objective`, `rollout`,
`train`). Every value is checked here, at the edge, so the core can trust it: an unknown key names the
closest valid one, a wrong type names the field and the type it wants.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmopd.losses import available_divergences
from mmopd.objective_table import KINDS, TABLE, estimators_of, needs_teacher, scores_teacher


class ConfigError(ValueError):
    """A config that cannot run, with a message that says what to change."""


DTYPES = ("auto", "float32", "bfloat16", "float16")
OBJECTIVES = KINDS
SAMPLED_KLS = ("k1", "k3")  # objective.sampled_kl (mmopd.losses.sampled.Shaping)
BASELINES = ("none", "loo", "batch")
FUSED = ("auto", "always", "never")
ESTIMATORS = ("full", "sampled")
TRAINABLE = ("full", "lm_only", "lora")
ROLLOUT_ENGINES = ("hf", "vllm")
TEACHER_ENGINES = ("hf", "vllm")
SHARDING = ("none", "fsdp")


@dataclass
class StudentConfig:
    path: str = ""
    dtype: str = "auto"
    trainable: str = "full"
    lora_rank: int = 16  # used by trainable: lora
    lora_alpha: float = 32.0
    gradient_checkpointing: bool = False


@dataclass
class TeacherConfig:
    name: str = ""  # several teachers (`teacher:` a list): what records name in their data.teacher_field
    path: str = ""
    dtype: str = "auto"
    cfg_scale: float = 1.0
    top_k: int = 0  # full estimator: keep only the teacher's top-k logits per token (0 keeps all)
    tail: bool = False  # top_k: the rest of the teacher's mass as one more class (a vLLM teacher always sends it)
    engine: str = "hf"  # who scores: hf (in-process) | vllm (prompt_logprobs: colocated, or served at url)
    url: str = ""  # vllm: the teacher's `vllm serve` (without LoRA, --max-logprobs >= top_k); empty: a vllm.LLM here
    gpu_memory_utilization: float = 0.3  # vllm colocated: its share of the GPU beside the trainer
    timeout: float = 120.0  # vllm: seconds per request before a retry
    retries: int = 3  # vllm: retries with backoff before the run stops naming the URL
    sharding: str = "none"  # none (a full copy per process) | fsdp (sharded over the processes, FSDP2)


@dataclass
class DataConfig:
    train: str = ""
    eval: str = ""
    skip_bad: bool = False
    eval_limit: int = 0  # 0 evaluates every eval record
    judge: str = ""  # a scoring model the modality's metric needs (image_tokens: the toy's classifier directory)
    split: str = "train"  # the split of data.train when it is a hub id or a save_to_disk folder of splits
    eval_split: str = "test"  # the split of data.eval, likewise
    subset: str = ""  # a hub dataset's configuration (its subset), if it has several
    fields: dict[str, str] = field(default_factory=dict)  # record field -> the set's column, e.g. {prompt: question}
    teacher_field: str = "teacher"  # several teachers: the record field naming each record's teacher


@dataclass
class ObjectiveConfig:
    kind: str = "on_policy"
    divergence: str = "reverse_kl"
    estimator: str = "full"
    beta: float = 0.5
    lmbda: float = 1.0
    sft_weight: float = 0.0
    temperature: float = 1.0  # divides both models' logits inside the divergence
    fused: str = "auto"  # divergences from hidden states and LM heads: auto | always | never
    sampled_kl: str = "k1"  # sampled: k1 (log p_S − log p_T) | k3 (verl's low_var_kl; the forward KL's gradient)
    # sampled, k1: a per-position leave-one-out mean of k, unbiased: none | loo (the prompt's samples) | batch (all rows)
    baseline: str = "none"
    advantage_clip: float = 0.0  # sampled, k1: clip the log-ratio to ±C (biased; 0: no clip)


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    samples_per_prompt: int = 1
    engine: str = "hf"  # who samples: hf (the in-process decode loop) | vllm (colocated, or served at url)
    url: str = ""  # vllm: a `vllm serve` to sample from (empty: a vllm.LLM in this process)
    timeout: float = 120.0  # vllm served: seconds per request before a retry
    retries: int = 3  # vllm served: retries with backoff before the run stops naming the URL
    gpu_memory_utilization: float = 0.3  # vllm colocated: its share of the GPU beside the trainer
    sleep: bool = False  # vllm colocated: free its weights and KV cache between rollouts
    sync_dir: str = ""  # vllm: where the trainer writes the weights the engine reloads (empty: /dev/shm)
    tis_cap: float = 0.0  # vllm, sampled estimator: truncated importance-sampling cap (0: no correction)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    warmup: int = 10
    seed: int = 0
    out_dir: str = "runs/x"
    save_every: int = 50
    keep_last: int = 0  # 0 keeps every checkpoint
    eval_every: int = 50
    eval_batch_size: int = 64
    log_every: int = 1
    max_grad_norm: float = 1.0
    resume: str = "auto"  # auto | never
    existing: str = "refuse"  # resume: never in a directory holding a run: refuse | move_aside (to NAME.old-N)
    resume_changes: list[str] = field(default_factory=list)  # run-defining keys a resume may change, e.g. [train.lr]
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    sharding: str = "none"  # the student: none (data parallel, DDP) | fsdp (sharded over the processes, FSDP2)
    fsdp_cpu_offload: bool = False  # sharding: fsdp: keep the student's shards, gradients and optimizer on the CPU
    # sample health (mmopd/health.py): warn once when the student's samples collapse
    health_min_entropy: float = 0.5  # nats of the batch's sampled tokens; below it: collapsing (0: off)
    health_max_repeat: float = 0.5  # share of tokens that repeat an earlier 3-gram of their response (1: off)
    health_max_length: float = 0.95  # mean length / rollout.max_new_tokens, having started below it (1: off)
    eval_kl_prompts: int = 8  # eval prompts for the forward and reverse KL to an in-process teacher (0: off)


@dataclass
class Config:
    modality: str = "text"
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)  # `teacher:` a list; `teacher` is then the first

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML writes it: `teacher` a list when there are several teachers."""
        raw = dataclasses.asdict(self)
        teachers = raw.pop("teachers")
        if teachers:
            raw["teacher"] = teachers
        return raw


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


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} is {value!r}, which is not one of {', '.join(options)}{hint}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _check_teacher_engine(config: Config, t: TeacherConfig) -> None:
    """A vLLM teacher (served or colocated) returns temperature-1 log-probs of given ids (or its top-k): refuse
    what needs more."""
    obj = config.objective
    if t.url and t.engine != "vllm":
        raise ConfigError(f"teacher.url is set, but teacher.engine={t.engine} scores in-process; set "
                          "teacher.engine=vllm to score with that server, or clear teacher.url")
    if t.engine != "vllm" or not scores_teacher(obj.kind, obj.estimator):
        return
    if t.sharding != "none":
        raise ConfigError(f"teacher.sharding={t.sharding} shards an in-process teacher, but teacher.engine=vllm holds "
                          "the teacher's weights in its engine; set teacher.sharding=none or teacher.engine=hf")
    if t.url and not t.url.startswith(("http://", "https://")):
        raise ConfigError(f"teacher.url={t.url!r} must be an http(s):// URL, e.g. http://127.0.0.1:8001")
    if TABLE[(obj.kind, obj.estimator)].teacher == "distribution" and not t.top_k:
        raise ConfigError(f"objective.kind={obj.kind} with estimator={obj.estimator} needs the teacher's full "
                          "distribution, which a vLLM teacher cannot send; set teacher.top_k: K (its top-k plus "
                          "a tail class), objective.estimator: sampled, or teacher.engine: hf")
    if obj.temperature != 1.0:
        raise ConfigError(f"objective.temperature={obj.temperature}, but a vLLM teacher's log-probs are at "
                          "temperature 1 and one log-prob (or a top-k) cannot be rescaled exactly; set "
                          "objective.temperature=1 or teacher.engine=hf")
    if t.cfg_scale != 1.0:
        raise ConfigError(f"teacher.cfg_scale={t.cfg_scale}: a guided teacher mixes the full logits of its "
                          "conditional and unconditional branches, which a vLLM teacher cannot send; set "
                          "teacher.cfg_scale=1 or teacher.engine=hf")
    if not 0.0 < t.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"teacher.gpu_memory_utilization must lie in (0, 1], got {t.gpu_memory_utilization}")
    _positive("teacher.timeout", t.timeout)
    _positive("teacher.retries", t.retries, allow_zero=True)


NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
AGREE = ("cfg_scale", "top_k", "sharding")  # what one step's teacher scores share: per-teacher values would differ


def _check_teachers(config: Config) -> None:
    """Several teachers by route: named uniquely, each valid as a single one, handing over one kind of score."""
    teachers = config.teachers
    for i, t in enumerate(teachers):
        if not t.name:
            raise ConfigError(f"teacher[{i}] has no name; with several teachers each needs one (records pick theirs "
                              f"by data.teacher_field: {config.data.teacher_field})")
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
    if config.objective.kind == "seq_kd":
        raise ConfigError("objective.kind=seq_kd samples its responses from one teacher; several teachers route "
                          "the scoring of responses only. Give one teacher, or another objective.kind")
    if first.sharding != "none":
        raise ConfigError("teacher.sharding=fsdp shards one teacher; with several teachers set sharding: none")


def _check_shaping(config: Config) -> None:
    """objective.sampled_kl, .baseline and .advantage_clip shape the sampled estimator only, one way at a time."""
    obj = config.objective
    _choice("objective.sampled_kl", obj.sampled_kl, SAMPLED_KLS)
    _choice("objective.baseline", obj.baseline, BASELINES)
    _positive("objective.advantage_clip", obj.advantage_clip, allow_zero=True)
    shaped = [f"{name}={value}" for name, value, plain in (("sampled_kl", obj.sampled_kl, "k1"),
              ("baseline", obj.baseline, "none"), ("advantage_clip", obj.advantage_clip, 0.0)) if value != plain]
    if shaped and obj.estimator != "sampled":
        raise ConfigError(f"objective.{shaped[0]} shapes the sampled estimator's coefficient; set "
                          "objective.estimator=sampled or leave it at its default")
    if obj.sampled_kl == "k3" and len(shaped) > 1:
        raise ConfigError("objective.sampled_kl=k3 is a loss differentiated as it stands (verl's low_var_kl); "
                          "objective.baseline and objective.advantage_clip shape k1's coefficient. Use one or the other")
    if obj.baseline == "loo" and config.rollout.samples_per_prompt < 2:
        raise ConfigError("objective.baseline=loo averages a prompt's other samples; set rollout.samples_per_prompt "
                          f">= 2 (got {config.rollout.samples_per_prompt})")


def validate(config: Config) -> None:
    """Check values that types alone cannot: choices, ranges and required paths."""
    if not config.student.path:
        raise ConfigError("student.path is required: a local model directory (or hub id)")
    obj = config.objective
    _choice("objective.kind", obj.kind, OBJECTIVES)
    _choice("objective.estimator", obj.estimator, ESTIMATORS)
    if (obj.kind, obj.estimator) not in TABLE:
        raise ConfigError(f"objective.estimator={obj.estimator} does not apply to objective.kind={obj.kind}; use "
                          f"{' or '.join(estimators_of(obj.kind))} (the sampled estimator is for on_policy only)")
    teachers = config.teachers or [config.teacher]
    for t in teachers:
        where = f"teacher {t.name!r}: " if config.teachers else "teacher."
        if needs_teacher(obj.kind, obj.estimator) and not t.path:
            raise ConfigError(f"{where}path is required for objective.kind={config.objective.kind}")
        _choice(f"{where}engine", t.engine, TEACHER_ENGINES)
        _choice(f"{where}dtype", t.dtype, DTYPES)
        if t.tail and not t.top_k:
            raise ConfigError(f"{where}tail adds a tail class to the teacher's top-k; set {where}top_k: K as well, "
                              f"or {where}tail: false for the full distribution")
    if config.teachers:
        _check_teachers(config)
    _choice("rollout.engine", config.rollout.engine, ROLLOUT_ENGINES)
    if config.rollout.url and config.rollout.engine != "vllm":
        raise ConfigError(f"rollout.url is set, but rollout.engine={config.rollout.engine} samples in-process; "
                          "set rollout.engine=vllm to sample from that server, or clear rollout.url")
    if config.rollout.url and not config.rollout.url.startswith(("http://", "https://")):
        raise ConfigError(f"rollout.url={config.rollout.url!r} must be an http(s):// URL, e.g. http://127.0.0.1:8000")
    for t in teachers:
        _check_teacher_engine(config, t)
    _positive("rollout.timeout", config.rollout.timeout)
    _positive("rollout.retries", config.rollout.retries, allow_zero=True)
    _positive("rollout.tis_cap", config.rollout.tis_cap, allow_zero=True)
    if not 0.0 < config.rollout.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"rollout.gpu_memory_utilization must lie in (0, 1], got {config.rollout.gpu_memory_utilization}")
    if config.rollout.tis_cap and obj.estimator != "sampled":
        raise ConfigError("rollout.tis_cap corrects the sampled estimator for the engine's numerics; the full "
                          "estimator does not use behaviour log-probs. Set rollout.tis_cap=0 or objective.estimator=sampled")
    if not config.data.train:
        raise ConfigError("data.train is required: a JSONL, JSON, parquet or CSV file, a save_to_disk folder or a hub id")
    _choice("student.dtype", config.student.dtype, DTYPES)
    _choice("student.trainable", config.student.trainable, TRAINABLE)
    _positive("student.lora_rank", config.student.lora_rank)
    if config.rollout.engine == "vllm" and config.student.trainable == "lora" and config.student.lora_rank > 512:
        raise ConfigError(f"student.lora_rank={config.student.lora_rank}: vLLM serves LoRA ranks up to 512; lower it "
                          "or set rollout.engine=hf")
    _positive("student.lora_alpha", config.student.lora_alpha)
    _choice("objective.divergence", config.objective.divergence, available_divergences())
    _choice("train.resume", config.train.resume, ("auto", "never"))
    _choice("train.sharding", config.train.sharding, SHARDING)
    _choice("teacher.sharding", config.teacher.sharding, SHARDING)
    if config.train.fsdp_cpu_offload and config.train.sharding != "fsdp":
        raise ConfigError("train.fsdp_cpu_offload offloads a sharded student; set train.sharding=fsdp or clear it")
    if config.train.sharding == "fsdp" and config.student.trainable == "lora" and config.rollout.engine == "vllm":
        raise ConfigError("student.trainable=lora with train.sharding=fsdp samples with rollout.engine=hf only (the "
                          "vLLM adapter sync does not gather sharded adapters); use rollout.engine=hf, or "
                          "train.sharding=none for LoRA through vLLM")
    if config.train.sharding == "fsdp" and config.rollout.engine == "vllm" and not config.rollout.url:
        raise ConfigError("rollout.engine=vllm with train.sharding=fsdp samples from a served engine only: set "
                          "rollout.url (a colocated engine on every rank would need the full weights on every "
                          "rank, which the sharded sync gathers onto rank 0), or use rollout.engine=hf")
    _choice("train.existing", config.train.existing, ("refuse", "move_aside"))
    if not config.train.out_dir.strip():
        raise ConfigError("train.out_dir is empty; name the run's output directory, e.g. train.out_dir=runs/x")
    known = {"modality"} | {f"{name}.{f.name}" for name, section in vars(config).items()
                            if dataclasses.is_dataclass(section) for f in dataclasses.fields(section)}
    for key in config.train.resume_changes:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"train.resume_changes names {key!r}, which is no config key{hint}")
    _choice("objective.fused", config.objective.fused, FUSED)
    _positive("teacher.top_k", config.teacher.top_k, allow_zero=True)
    if config.teacher.top_k and config.objective.estimator == "sampled":
        raise ConfigError("teacher.top_k keeps the teacher's top-k logits for objective.estimator=full; the sampled "
                          "estimator needs only each sampled token's log-prob. Set teacher.top_k=0")
    _check_shaping(config)
    if config.objective.estimator == "sampled" and config.objective.divergence != "reverse_kl":
        raise ConfigError(
            "objective.estimator=sampled estimates the reverse KL only; "
            f"set objective.divergence=reverse_kl (got {config.objective.divergence})"
        )
    for name, value in (("objective.beta", config.objective.beta), ("objective.lmbda", config.objective.lmbda),
                        ("rollout.top_p", config.rollout.top_p)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], got {value}")
    if config.rollout.top_p == 0.0:
        raise ConfigError("rollout.top_p must be > 0 (1.0 disables nucleus sampling)")
    _positive("objective.sft_weight", config.objective.sft_weight, allow_zero=True)
    _positive("objective.temperature", config.objective.temperature)
    _positive("rollout.temperature", config.rollout.temperature, allow_zero=True)
    _positive("teacher.cfg_scale", config.teacher.cfg_scale, allow_zero=True)
    for name in ("max_new_tokens", "samples_per_prompt"):
        _positive(f"rollout.{name}", getattr(config.rollout, name))
    _positive("rollout.top_k", config.rollout.top_k, allow_zero=True)
    for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
        _positive(f"train.{name}", getattr(config.train, name))
    for name in ("warmup", "save_every", "keep_last", "eval_every", "seed"):
        _positive(f"train.{name}", getattr(config.train, name), allow_zero=True)
    _positive("train.lr", config.train.lr)
    _positive("train.weight_decay", config.train.weight_decay, allow_zero=True)
    _positive("train.max_grad_norm", config.train.max_grad_norm, allow_zero=True)
    _positive("data.eval_limit", config.data.eval_limit, allow_zero=True)
    _positive("train.health_min_entropy", config.train.health_min_entropy, allow_zero=True)
    _positive("train.eval_kl_prompts", config.train.eval_kl_prompts, allow_zero=True)
    for name in ("health_max_repeat", "health_max_length"):
        value = getattr(config.train, name)
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"train.{name} must lie in (0, 1] (1 turns the check off), got {value}")
    for tracker in config.train.report_to:
        _choice("train.report_to", tracker, ("tensorboard", "wandb"))
