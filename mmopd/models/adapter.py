"""The ModalityAdapter protocol and the registry of adapters by name.

The core speaks tokens, logits and masks. An adapter turns records into model inputs, says which token
ids the policy may emit, and shows responses to people. Adapters register by name; the core finds one
by the config's `modality` through `register_adapter` or the `mmopd.modalities` entry point group.
How the models are loaded and called is the adapter's `calls` (`mmopd.models.hf.ModelCalls`, whose defaults drive
any Hugging Face causal model; a modality subclasses it where its models differ). What vLLM needs of a model
family is keyed by the family in the engine code (`mmopd.engines.vllm.families`). Toy tasks and end-of-run
reports are not model I/O: they live in `mmopd.run.toys`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from mmopd.config import Config, ConfigError, StudentConfig
from mmopd.data.records import RecordError
from mmopd.models.hf import ModelCalls, ModelLoadError
from mmopd.models.hf import fused_unsupported as _head_unsupported
from mmopd.models.hf import load_pretrained
from mmopd.models.lora import add_lora, linear_layers_of_language_model
from mmopd.step.batch import PromptBatch, Sampling, TokenSpace
from mmopd.step.objective_table import needs_answers
from mmopd.step.rewards import reads_answers

__all__ = ["ModalityAdapter", "ModelCalls", "ModelLoadError", "PolicySide", "RunSettings", "available_adapters",
           "eval_check", "fused_unsupported", "get_adapter", "load_pretrained", "prepare_trainable", "register_adapter",
           "settings_of"]

_REGISTRY: dict[str, type["ModalityAdapter"]] = {}


@dataclass(frozen=True)
class RunSettings:
    """What an adapter may know of the run beyond its method arguments, named one by one (not the whole Config):
    the image generators read the student's classes from its path, guide the teacher, judge the pictures with a
    classifier and sample evaluations like the rollout."""

    student_path: str = ""
    max_new_tokens: int = 0  # rollout.max_new_tokens: a picture's fixed token count must equal it
    sampling: Sampling = field(default_factory=Sampling)  # the rollout's sampling (temperature, top-k, top-p)
    cfg_scale: float = 1.0  # teacher.cfg_scale
    judge: str = ""  # data.judge
    evaluates: bool = False  # data.eval is set
    trains_on_answers: bool = False  # the objective reads dataset answers (objective_table.needs_answers)
    objective: str = ""  # objective.kind, for messages


def settings_of(config: Config) -> RunSettings:
    """The run's settings an adapter may read, from the validated Config."""
    o, r = config.objective, config.rollout
    return RunSettings(student_path=config.student.path, max_new_tokens=r.max_new_tokens,
                       sampling=Sampling(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p),
                       cfg_scale=config.teacher.cfg_scale, judge=config.data.judge, evaluates=bool(config.data.eval),
                       trains_on_answers=needs_answers(o.kind, o.estimator, o.lmbda, o.sft_weight,
                                                       reads_answers(o.reward)),
                       objective=o.kind)


class ModalityAdapter:
    """Everything modality-specific about data: loading processors, checking and encoding records, the token space,
    decoding and scoring responses. Subclasses set `name` and `metric` and implement the methods that raise
    NotImplementedError. How the models are loaded and called is `calls` (HF causal-model defaults); the extra
    `student.trainable` modes a modality offers are `trainable_modes`. An adapter is built for a run by
    `get_adapter(name, settings)`; `settings` hold what it may read of the run (RunSettings)."""

    name: str = ""
    metric: str = "accuracy"
    supports_cfg: bool = False  # whether a teacher can be guided (teacher.cfg_scale != 1)
    # whether evaluation reports the student's forward and reverse KL to an in-process teacher (train.eval_kl_prompts)
    reports_kl: bool = False
    prompt_pictures: bool = False  # whether prompts carry pictures (PromptBatch.state["images"]) for an engine
    # why a record's teacher-only prompt (data.teacher_prompt_field) means nothing to this modality; None: supported
    teacher_prompt_refusal: str | None = None
    # whether responses are text a teacher with another tokenizer reads re-encoded, aligned by character spans
    # (mmopd/step/cross_tokenizer.py; `check_pair` then checks the two tokenizers can be aligned)
    aligns_text: bool = False
    scores_answers: bool = False  # whether `score` compares each response with its record's 'answer'
    judges: bool = False  # whether `score` grades each response with the modality's judge (a classifier)
    calls: ModelCalls = ModelCalls()  # loading and calling the models
    # student.trainable modes beyond full and lora: name -> the model prepared for training (see prepare_trainable)
    trainable_modes: dict[str, Callable[[nn.Module], nn.Module]] = {}

    def __init__(self, settings: RunSettings | None = None) -> None:
        self.settings = settings

    def eval_sampling(self) -> Sampling:
        """How evaluation draws responses: greedy unless a modality's metric needs samples (pictures are judged
        on samples, as FID is). The evaluation sets max_new_tokens."""
        return Sampling(temperature=0)

    # --- loading -------------------------------------------------------------------------------
    def load_processor(self, path: str, role: str) -> Any:
        raise NotImplementedError

    def check_pair(self, student_processor: Any, teacher_processor: Any,
                   student: nn.Module, teacher: nn.Module) -> None:
        """Raise IncompatibleModelsError if the teacher cannot score the student's tokens."""
        raise NotImplementedError

    def token_space(self, processor: Any, model: nn.Module) -> TokenSpace:
        raise NotImplementedError

    def eos_token_ids(self, processor: Any) -> list[int]:
        raise NotImplementedError

    # --- data --------------------------------------------------------------------------------
    def check_record(self, raw: dict, base_dir: Path) -> dict:
        """Validate one JSONL record (raise data.RecordError) and return it, with paths resolved."""
        raise NotImplementedError

    def encode_prompts(self, records: list[dict], processor: Any) -> PromptBatch:
        raise NotImplementedError

    def measure_prompts(self, records: list[dict], processor: Any) -> list[int | str | None]:
        """Each prompt as the student reads it, to refuse unusable prompts before step 1: its length in tokens (to
        refuse prompts longer than the context), or why the student cannot read it (e.g. text the tokenizer knows
        none of), or None where neither is known before the pictures are encoded."""
        return [None] * len(records)

    def encode_answers(self, records: list[dict], processor: Any) -> list[list[int]]:
        """Dataset answers as response token ids, ending with EOS (for sft, supervised_kd, gkd)."""
        raise NotImplementedError

    def decode(self, tokens: Tensor, mask: Tensor, processor: Any) -> list[Any]:
        """Responses [B, T] as the user sees them (text, or a picture)."""
        raise NotImplementedError

    def score(self, records: list[dict], responses: list[Any]) -> dict[str, float]:
        """Task metrics for a batch of responses; must include `self.metric`."""
        raise NotImplementedError


@dataclass
class PolicySide:
    """One model's side of sampling and scoring, travelling as one value: the adapter that speaks for it, the model,
    its processor, the token space it may emit, the ids that end a response and the id that pads one."""

    adapter: ModalityAdapter
    model: nn.Module
    processor: Any
    space: TokenSpace
    eos_ids: list[int]
    pad_id: int


def eval_check(adapter: ModalityAdapter, check_record: Callable[[dict, Path], dict] | None = None
               ) -> Callable[[dict, Path], dict]:
    """The check of a data.eval record: `check_record` (the adapter's, by default), and that evaluation can score the
    record. Every eval record counts in the metric's denominator, so one without the answer it is scored against is
    refused when the set loads, never dropped at scoring."""
    base = check_record or adapter.check_record

    def check(raw: dict, base_dir: Path) -> dict:
        record = base(raw, base_dir)
        if adapter.scores_answers and record.get("answer") is None:
            raise RecordError(f"no 'answer' to score the response against; every data.eval record needs one "
                              f"(the {adapter.metric} counts every record)")
        return record
    return check


def prepare_trainable(adapter: ModalityAdapter, model: nn.Module, student: StudentConfig) -> nn.Module:
    """The student as it will be trained, per `student.trainable`: `full` trains every weight, `lora` wraps it in
    peft LoRA adapters on its language model's linear layers; a modality adds modes in `trainable_modes` (the VLM
    adapter's `lm_only`)."""
    if student.trainable == "full":
        return model
    if student.trainable == "lora":
        return add_lora(model, linear_layers_of_language_model(model), student.lora_rank, student.lora_alpha)
    if student.trainable in adapter.trainable_modes:
        return adapter.trainable_modes[student.trainable](model)
    raise ConfigError(f"student.trainable={student.trainable} is not supported by the {adapter.name} adapter; "
                      "use full or lora")


def fused_unsupported(adapter: ModalityAdapter, model: nn.Module) -> str | None:
    """Why `adapter.calls.response_hidden` + the LM head cannot stand in for its response_logits with `model`
    (None: they can)."""
    if type(adapter.calls).response_logits is not ModelCalls.response_logits:
        return f"the {adapter.name or type(adapter).__name__} adapter computes its own response logits"
    return _head_unsupported(model)


def register_adapter(name: str) -> Callable[[type[ModalityAdapter]], type[ModalityAdapter]]:
    def decorate(cls: type[ModalityAdapter]) -> type[ModalityAdapter]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def available_adapters() -> list[str]:
    names = set(_REGISTRY) | {ep.name for ep in entry_points(group="mmopd.modalities")}
    return sorted(names)


def get_adapter(name: str, settings: RunSettings | None = None) -> ModalityAdapter:
    """The adapter registered as `name` (loading entry points on first use), built with the run's `settings`."""
    if name not in _REGISTRY:
        for ep in entry_points(group="mmopd.modalities"):
            if ep.name == name:
                _REGISTRY[name] = ep.load()
    if name not in _REGISTRY:
        raise ConfigError(f"modality {name!r} has no adapter; available: {', '.join(available_adapters()) or 'none'}")
    return _REGISTRY[name](settings)

