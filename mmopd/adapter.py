"""The ModalityAdapter protocol and the registry of adapters by name.

The core speaks tokens, logits and masks. An adapter turns records into model inputs, says which token
ids the policy may emit, and shows responses to people. Adapters register by name; the core finds one
by the config's `modality` through `register_adapter` or the `mmopd.modalities` entry point group.
The default model calls here drive any Hugging Face causal model (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values`, through `mmopd.hf`); a modality overrides what differs. Toy tasks and
end-of-run reports are not model I/O: they live in `mmopd.toys`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import AutoConfig

from mmopd.hf import (LOGIT_TRANSFORMS, base_model, cache_arg, cache_of, check_head_reproduces, forward_params,
                      keep_last, positions, text_config)
from mmopd.batch import PromptBatch, Sampling, TokenSpace
from mmopd.config import Config, ConfigError, StudentConfig
from mmopd.lora import add_lora, linear_layers_of_language_model
from mmopd.scores import Hidden

_REGISTRY: dict[str, type["ModalityAdapter"]] = {}


class ModelLoadError(ValueError):
    """A model or processor that cannot be loaded from the configured path."""


class ModalityAdapter:
    """Everything modality-specific. Subclasses set `name` and `metric` and implement the loaders,
    record checks, encoders and scoring; the HF causal-model defaults below cover rollout and scoring."""

    name: str = ""
    metric: str = "accuracy"
    supports_cfg: bool = False  # whether a teacher can be guided (teacher.cfg_scale != 1)
    # whether evaluation reports the student's forward and reverse KL to an in-process teacher (train.eval_kl_prompts)
    reports_kl: bool = False

    def configure(self, config: Config) -> None:
        """Called once by the Session, before any data or model is loaded, with the run's validated Config:
        for settings an adapter needs beyond its arguments (e.g. the teacher's cfg_scale, the eval sampling)."""

    def eval_sampling(self) -> Sampling:
        """How evaluation draws responses: greedy unless a modality's metric needs samples (pictures are judged
        on samples, as FID is). The evaluation sets max_new_tokens."""
        return Sampling(temperature=0)

    # --- loading -------------------------------------------------------------------------------
    def load_processor(self, path: str, role: str) -> Any:
        raise NotImplementedError

    def model_class(self, path: str) -> Any:
        """The transformers class (or Auto class) that loads the model at `path`."""
        raise NotImplementedError

    def load_model(self, path: str, role: str, dtype: torch.dtype) -> nn.Module:
        return load_pretrained(self.model_class(path).from_pretrained, path, role, dtype=dtype)

    def load_skeleton(self, path: str, role: str) -> nn.Module:
        """The model at `path` built from its config alone, on the meta device: its classes, config and shapes for
        the checks before step 1, and no weights (a vLLM teacher's engine loads those itself)."""
        config = load_pretrained(AutoConfig.from_pretrained, path, role)
        cls = self.model_class(path)
        with torch.device("meta"):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        return model.eval().requires_grad_(False)

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

    def unreadable_prompts(self, records: list[dict], processor: Any) -> list[str | None]:
        """Why each prompt cannot be read by the student (None where it can), to refuse such prompts before step 1:
        e.g. text the tokenizer knows none of."""
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
        position_ids = positions(prompts.attention_mask)
        out = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                    position_ids=position_ids, use_cache=True, **keep_last(model, 1), **prompts.model_inputs)
        state = (cache_of(out), prompts.attention_mask, position_ids[:, -1])
        return out.logits[:, -1], state

    def step(self, model: nn.Module, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Feed one token per row [B]; return the next logits [B, V] and the new state."""
        cache, mask, last_pos = state
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = last_pos + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                    use_cache=True, **cache_arg(model, cache))
        return out.logits[:, -1], (cache_of(out), mask, pos)

    def response_logits(self, model: nn.Module, prompts: PromptBatch, tokens: Tensor) -> Tensor:
        """Logits that score each response token: row t predicts tokens[:, t]. [B, T] -> [B, T, V]"""
        T = tokens.shape[1]
        input_ids = torch.cat([prompts.input_ids, tokens], dim=1)  # [B, P+T]
        mask = torch.cat([prompts.attention_mask, torch.ones_like(tokens)], dim=1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                    **keep_last(model, T + 1), **prompts.model_inputs)
        return out.logits[:, -(T + 1):-1]

    # --- engines -------------------------------------------------------------------------------------
    def engine_key(self, key: str, model: nn.Module) -> str:
        """A checkpoint key of `model` as vLLM's loader names it (the default: as transformers saves it)."""
        return key

    def vllm_unsupported(self, model: nn.Module, served: bool) -> str | None:
        """Why vLLM cannot sample from `model` (served: from a `vllm serve` over token-id completions); None: it
        can. The default allows any HF causal LM."""
        return None

    # --- fused scoring: hidden states and the LM head instead of logits ------------------------
    def fused_unsupported(self, model: nn.Module) -> str | None:
        """Why response_hidden + the LM head cannot stand in for response_logits with `model` (None: they can)."""
        if type(self).response_logits is not ModalityAdapter.response_logits:
            return f"the {self.name or type(self).__name__} adapter computes its own response logits"
        base = base_model(model)
        if "logits_to_keep" not in forward_params(model):
            return f"{type(base).__name__}.forward takes no logits_to_keep, so it would build every logit"
        config = text_config(model)
        for key in LOGIT_TRANSFORMS:
            if getattr(config, key, None) not in (None, 0, 1, 1.0):
                return f"{type(base).__name__} transforms its logits ({key}={getattr(config, key)})"
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if type(head) is not nn.Linear:
            return f"{type(base).__name__}'s output embeddings are {type(head).__name__}, not a plain nn.Linear"
        return None

    def response_hidden(self, model: nn.Module, prompts: PromptBatch, tokens: Tensor) -> Hidden:
        """Last hidden states that score each response token, and the LM head. [B, T] -> [B, T, H], [V, H], [V]

        Runs the model through its own forward (so peft and DDP wrappers work) with output_hidden_states and
        logits_to_keep=1, and checks that the head reproduces the one logit row the model did build."""
        T = tokens.shape[1]
        input_ids = torch.cat([prompts.input_ids, tokens], dim=1)  # [B, P+T]
        mask = torch.cat([prompts.attention_mask, torch.ones_like(tokens)], dim=1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                    output_hidden_states=True, logits_to_keep=1, **prompts.model_inputs)
        last = out.hidden_states[-1]  # [B, P+T, H]
        head = base_model(model).get_output_embeddings()
        check_head_reproduces(out.logits[:, -1], last[:, -1], head.weight, head.bias, type(base_model(model)))
        return Hidden(last[:, -(T + 1):-1], head.weight, head.bias, out.logits.dtype)


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
        raise ConfigError(f"modality {name!r} has no adapter; available: {', '.join(available_adapters()) or 'none'}")
    return _REGISTRY[name]()


def load_pretrained(loader: Callable[..., Any], path: str, role: str, **kwargs: Any) -> Any:
    """Call `loader(path)` and turn a missing or broken checkpoint into one clear error."""
    local = Path(path).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{role}.path={path!r} is a file; point it at a model directory")
    try:
        return loader(str(local) if local.is_dir() else path, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # SafetensorError: garbage or truncated weights
        where = "" if local.is_dir() else " (not a local directory, and loading it as a hub id failed)"
        reason = " ".join(str(err).split())  # transformers' messages run over several lines
        raise ModelLoadError(f"{role}.path={path!r}: cannot load{where}: {reason}") from err
