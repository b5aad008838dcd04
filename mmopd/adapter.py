"""The ModalityAdapter protocol, the registry of adapters by name, and loading helpers.

The core speaks tokens, logits and masks. An adapter turns records into model inputs, says which token
ids the policy may emit, and shows responses to people. Adapters register by name; the core finds one
by the config's `modality` through `register_adapter` or the `mmopd.modalities` entry point group.
The default methods here drive any Hugging Face causal model (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values`); a modality overrides what differs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from mmopd.config import Config, ConfigError, StudentConfig
from mmopd.lora import add_lora, linear_layers_of_language_model

if TYPE_CHECKING:
    from mmopd.rollout import Sampling

_REGISTRY: dict[str, type["ModalityAdapter"]] = {}


class ModelLoadError(ValueError):
    """A model or processor that cannot be loaded from the configured path."""


@dataclass
class PromptBatch:
    """Encoded prompts for one model: left-padded ids plus any extra model inputs (pixels, ...)."""

    input_ids: Tensor  # [B, P]
    attention_mask: Tensor  # [B, P]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "PromptBatch":
        extras = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.extras.items()}
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), extras)


@dataclass
class ResponseHidden:
    """What scores each response token before the LM head: logits = hidden·weightᵀ + bias."""

    hidden: Tensor  # [B, T, H] last hidden states; row t predicts tokens[:, t]
    weight: Tensor  # [V, H] the output projection (or [A, H] once restricted to a TokenSpace)
    bias: Tensor | None  # [V] or None
    logits_dtype: torch.dtype | None = None  # what the model's own head produced (bf16 under mixed precision)

    def restrict(self, space: "TokenSpace") -> "ResponseHidden":
        return ResponseHidden(self.hidden, *space.restrict_head(self.weight, self.bias), self.logits_dtype)

    def head_precision(self) -> Any:
        """A context in which the losses' head matmuls run in the dtype the model's own head ran in: autocast
        when that differs from the weight's (fp32 master weights under bf16 mixed precision), else a no-op."""
        dtype = self.logits_dtype
        enabled = dtype in (torch.bfloat16, torch.float16) and dtype != self.weight.dtype
        return torch.autocast(self.weight.device.type, dtype=dtype if enabled else None, enabled=enabled)


# config fields that transform h·Wᵀ before it becomes logits (the fused path would miss them)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


class TokenSpace:
    """The token ids a policy may emit. Divergences and sampling run over this restricted vocabulary
    (renormalised), so padded embedding rows or non-codebook tokens never get probability mass."""

    def __init__(self, size: int, ids: Tensor | None = None):
        self.size = size
        self.ids = ids  # [A] token id of each action, or None for the contiguous range [0, size)

    def restrict(self, logits: Tensor) -> Tensor:
        """[..., V_model] -> [..., A]"""
        if self.ids is None:
            return logits[..., : self.size]
        return logits.index_select(-1, self.ids.to(logits.device))

    def restrict_head(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The LM head's rows for the actions: [V_model, H], [V_model] -> [A, H], [A] (a view when contiguous)."""
        if self.ids is None:
            return weight[: self.size], None if bias is None else bias[: self.size]
        ids = self.ids.to(weight.device)
        return weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids)

    def to_tokens(self, actions: Tensor) -> Tensor:
        return actions if self.ids is None else self.ids.to(actions.device)[actions]

    def to_actions(self, tokens: Tensor) -> Tensor:
        if self.ids is None:
            return tokens
        lookup = torch.full((int(self.ids.max()) + 1,), -1, dtype=torch.long, device=tokens.device)
        lookup[self.ids.to(tokens.device)] = torch.arange(self.size, device=tokens.device)
        return lookup[tokens.clamp(max=lookup.numel() - 1)]


class ModalityAdapter:
    """Everything modality-specific. Subclasses set `name` and `metric` and implement the loaders,
    record checks, encoders and scoring; the HF causal-model defaults below cover rollout and scoring."""

    name: str = ""
    metric: str = "accuracy"
    supports_cfg: bool = False  # whether a teacher can be guided (teacher.cfg_scale != 1)

    def configure(self, config: Config) -> None:
        """Called once by the Session, before any data or model is loaded, with the run's validated Config:
        for settings an adapter needs beyond its arguments (e.g. the teacher's cfg_scale, the eval sampling)."""

    def eval_sampling(self) -> Sampling:
        """How evaluation draws responses (a rollout.Sampling): greedy unless a modality's metric needs samples
        (pictures are judged on samples, as FID is)."""
        from mmopd.rollout import Sampling  # rollout imports this module

        return Sampling(temperature=0)

    # --- loading -------------------------------------------------------------------------------
    def load_processor(self, path: str, role: str) -> Any:
        raise NotImplementedError

    def load_model(self, path: str, role: str, dtype: torch.dtype) -> nn.Module:
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

    def prompt_lengths(self, records: list[dict], processor: Any) -> list[int] | None:
        """Each prompt's length in tokens, to refuse prompts longer than the context before step 1
        (None where the length is only known after encoding images)."""
        return None

    def encode_answers(self, records: list[dict], processor: Any) -> list[list[int]]:
        """Dataset answers as response token ids, ending with EOS (for sft, supervised_kd, gkd)."""
        raise NotImplementedError

    def decode(self, tokens: Tensor, mask: Tensor, processor: Any) -> list[Any]:
        """Responses [B, T] as the user sees them (text, or a picture)."""
        raise NotImplementedError

    def score(self, records: list[dict], responses: list[Any]) -> dict[str, float]:
        """Task metrics for a batch of responses; must include `self.metric`."""
        raise NotImplementedError

    def build_toy(self, out_dir: Path, family: str | None, progress: bool = True) -> Path:
        """Build the modality's toy task in out_dir and return the path of a ready config."""
        raise NotImplementedError

    def write_report(self, out_dir: Path, session: Any, summary: dict[str, Any]) -> None:
        """Modality-specific artefacts at the end of a run (e.g. sample grids); text needs none."""

    # --- what trains -----------------------------------------------------------------------------
    def prepare_trainable(self, model: nn.Module, student: StudentConfig) -> nn.Module:
        """The student as it will be trained, per `student.trainable`: `full` trains every weight, `lora`
        wraps it in peft LoRA adapters on its language model's linear layers. Modalities add modes
        (the VLM adapter's `lm_only`) by overriding this."""
        if student.trainable == "full":
            return model
        if student.trainable == "lora":
            return add_lora(model, linear_layers_of_language_model(model), student.lora_rank, student.lora_alpha)
        raise ConfigError(f"student.trainable={student.trainable} is not supported by the {self.name} adapter; "
                          "use full or lora")

    # --- model calls (HF causal-model defaults) ------------------------------------------------
    def start(self, model: nn.Module, prompts: PromptBatch) -> tuple[Tensor, Any]:
        """Prefill: the next-token logits [B, V] after each prompt and the decoding state."""
        position_ids = _positions(prompts.attention_mask)
        out = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                    position_ids=position_ids, use_cache=True, **_keep_last(model, 1), **prompts.extras)
        state = (_cache_of(out), prompts.attention_mask, position_ids[:, -1])
        return out.logits[:, -1], state

    def step(self, model: nn.Module, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Feed one token per row [B]; return the next logits [B, V] and the new state."""
        cache, mask, last_pos = state
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = last_pos + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                    use_cache=True, **_cache_arg(model, cache))
        return out.logits[:, -1], (_cache_of(out), mask, pos)

    def response_logits(self, model: nn.Module, prompts: PromptBatch, tokens: Tensor) -> Tensor:
        """Logits that score each response token: row t predicts tokens[:, t]. [B, T] -> [B, T, V]"""
        T = tokens.shape[1]
        input_ids = torch.cat([prompts.input_ids, tokens], dim=1)  # [B, P+T]
        mask = torch.cat([prompts.attention_mask, torch.ones_like(tokens)], dim=1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                    **_keep_last(model, T + 1), **prompts.extras)
        return out.logits[:, -(T + 1):-1]

    # --- fused scoring: hidden states and the LM head instead of logits ------------------------
    def fused_unsupported(self, model: nn.Module) -> str | None:
        """Why response_hidden + the LM head cannot stand in for response_logits with `model` (None: they can)."""
        if type(self).response_logits is not ModalityAdapter.response_logits:
            return f"the {self.name or type(self).__name__} adapter computes its own response logits"
        base = base_model(model)
        if "logits_to_keep" not in _forward_params(model):
            return f"{type(base).__name__}.forward takes no logits_to_keep, so it would build every logit"
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        for key in _LOGIT_TRANSFORMS:
            if getattr(config, key, None) not in (None, 0, 1, 1.0):
                return f"{type(base).__name__} transforms its logits ({key}={getattr(config, key)})"
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if type(head) is not nn.Linear:
            return f"{type(base).__name__}'s output embeddings are {type(head).__name__}, not a plain nn.Linear"
        return None

    def response_hidden(self, model: nn.Module, prompts: PromptBatch, tokens: Tensor) -> ResponseHidden:
        """Last hidden states that score each response token, and the LM head. [B, T] -> [B, T, H], [V, H], [V]

        Runs the model through its own forward (so peft and DDP wrappers work) with output_hidden_states and
        logits_to_keep=1, and checks that the head reproduces the one logit row the model did build."""
        T = tokens.shape[1]
        input_ids = torch.cat([prompts.input_ids, tokens], dim=1)  # [B, P+T]
        mask = torch.cat([prompts.attention_mask, torch.ones_like(tokens)], dim=1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                    output_hidden_states=True, logits_to_keep=1, **prompts.extras)
        last = out.hidden_states[-1]  # [B, P+T, H]
        head = base_model(model).get_output_embeddings()
        _check_head_reproduces(out.logits[:, -1], last[:, -1], head.weight, head.bias, type(base_model(model)))
        return ResponseHidden(last[:, -(T + 1):-1], head.weight, head.bias, out.logits.dtype)


def _check_head_reproduces(logits: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, cls: type) -> None:
    """The model's last logits [B, V] must equal head(last hidden state) [B, H], else hidden_states[-1] is not
    what its head reads (an unnormalised state, a scaled head) and the fused path would train the wrong thing."""
    with torch.no_grad():
        error = (torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float() - logits.float()).abs()
        agree = bool(error.max() <= 2e-2 * (1.0 + logits.float().abs().max()))  # one device sync
    if not agree:
        raise ValueError(f"{cls.__name__}: its last hidden state through its output embeddings differs from its "
                         f"logits (max error {error.max().item():.3g}), so logits cannot be fused from hidden "
                         "states; set objective.fused=never")


def base_model(model: nn.Module) -> nn.Module:
    """The model inside DDP and peft (LoRA) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding. [B, L] -> [B, L]"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _forward_params(model: nn.Module) -> frozenset[str]:
    return _params_of(type(base_model(model)))


@functools.lru_cache(maxsize=None)
def _params_of(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _cache_arg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache as the model's forward names it (`cache` in newer transformers, else `past_key_values`)."""
    return {"cache": cache} if "cache" in _forward_params(model) else {"past_key_values": cache}


def _cache_of(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _keep_last(model: nn.Module, n: int) -> dict[str, int]:
    """`logits_to_keep=n` where the model supports it, so unused prompt logits are never built."""
    return {"logits_to_keep": n} if "logits_to_keep" in _forward_params(model) else {}


def register_adapter(name: str) -> Callable[[type[ModalityAdapter]], type[ModalityAdapter]]:
    def decorate(cls: type[ModalityAdapter]) -> type[ModalityAdapter]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def available_adapters() -> list[str]:
    names = set(_REGISTRY) | {ep.name for ep in entry_points(group="mmopd.modalities")}
    return sorted(names)


def get_adapter(name: str) -> ModalityAdapter:
    """The adapter registered as `name`, loading entry points on first use."""
    if name not in _REGISTRY:
        for ep in entry_points(group="mmopd.modalities"):
            if ep.name == name:
                _REGISTRY[name] = ep.load()
    if name not in _REGISTRY:
        raise ValueError(f"modality {name!r} has no adapter; available: {', '.join(available_adapters()) or 'none'}")
    return _REGISTRY[name]()


def load_pretrained(loader: Callable[..., Any], path: str, role: str, **kwargs: Any) -> Any:
    """Call `loader(path)` and turn a missing or broken checkpoint into one clear error."""
    local = Path(path).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{role}.path={path!r} is a file; point it at a model directory")
    try:
        return loader(str(local) if local.is_dir() else path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        where = "" if local.is_dir() else " (not a local directory, and loading it as a hub id failed)"
        raise ModelLoadError(f"{role}.path={path!r}: cannot load{where}: {err}") from err
