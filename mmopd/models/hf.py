"""Calling Hugging Face models: the keyword arguments that differ between transformers versions and model
classes, position ids under left padding, and unwrapping DDP and peft; and `ModelCalls`, the one default
implementation of the model calls (load, prefill, decode step, teacher-forced logits, hidden states for the
fused head) for any Hugging Face causal model. A modality whose models are called otherwise subclasses
`ModelCalls` and overrides what differs."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from mmopd.step.batch import PromptBatch
from mmopd.step.scores import Hidden

# config fields that transform h·Wᵀ before it becomes logits (a fused head would miss them)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def base_model(model: nn.Module) -> nn.Module:
    """The model inside DDP and peft (LoRA) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding. [B, L] -> [B, L]"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_params(model: nn.Module) -> frozenset[str]:
    """The keyword names the model's own forward takes (through its wrappers)."""
    return _params_of(type(base_model(model)))


@functools.lru_cache(maxsize=None)
def _params_of(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_arg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache as the model's forward names it (`cache` in newer transformers, else `past_key_values`)."""
    return {"cache": cache} if "cache" in forward_params(model) else {"past_key_values": cache}


def cache_of(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def keep_last(model: nn.Module, n: int) -> dict[str, int]:
    """`logits_to_keep=n` where the model supports it, so unused prompt logits are never built."""
    return {"logits_to_keep": n} if "logits_to_keep" in forward_params(model) else {}


def text_config(model: nn.Module) -> Any:
    """The config of the model's language part (the model's own config for a plain causal LM)."""
    config = base_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (its text config's max_position_embeddings)."""
    return getattr(text_config(model), "max_position_embeddings", None)


def check_head_reproduces(logits: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, cls: type) -> None:
    """The model's last logits [B, V] must equal head(last hidden state) [B, H], else hidden_states[-1] is not
    what its head reads (an unnormalised state, a scaled head) and a fused head would train the wrong thing."""
    with torch.no_grad():
        error = (torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float() - logits.float()).abs()
        agree = bool(error.max() <= 2e-2 * (1.0 + logits.float().abs().max()))  # one device sync
    if not agree:
        raise ValueError(f"{cls.__name__}: its last hidden state through its output embeddings differs from its "
                         f"logits (max error {error.max().item():.3g}), so logits cannot be fused from hidden "
                         "states; set objective.fused=never")


class ModelLoadError(ValueError):
    """A model or processor that cannot be loaded from the configured path."""


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


def fused_unsupported(model: nn.Module) -> str | None:
    """Why the model's last hidden states + its LM head cannot stand in for its logits (None: they can)."""
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


class ModelCalls:
    """How a modality's models are loaded and called: the defaults drive any Hugging Face causal model
    (`input_ids`, `attention_mask`, `position_ids`, `past_key_values`). A modality overrides what differs
    (the VLM's multimodal rope, the image generators' guidance) and sets its subclass as `ModalityAdapter.calls`."""

    def model_class(self, path: str) -> Any:
        """The transformers class (or Auto class) that loads the model at `path`."""
        return AutoModelForCausalLM

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
