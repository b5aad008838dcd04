"""Calling Hugging Face models: the keyword arguments that differ between transformers versions and model
classes, position ids under left padding, and unwrapping DDP and peft. Adapters build their model calls
from these."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

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
