"""What transformers' mixers share: reading their cache across transformers versions."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedInputError


def cache_states(cache: Any, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(conv_state, recurrent_state)`` a mixer will read from ``cache``, or ``None`` where there is none.

    transformers ≥ 5.2x: ``cache.get_conv_state(i)`` (``None`` until the layer has a previous state);
    earlier 5.x: ``cache.has_previous_state(i)`` and ``cache.layers[i].conv_states[0]``.
    """
    if cache is None:
        return None, None
    if hasattr(cache, "get_conv_state"):
        return cache.get_conv_state(layer_idx), cache.get_recurrent_state(layer_idx)
    has_previous = getattr(cache, "has_previous_state", None)
    if callable(has_previous) and has_previous(layer_idx):
        layer = cache.layers[layer_idx]
        return layer.conv_states[0], layer.recurrent_states[0]
    return None, None


def keep_conv_context(record: Any, conv_state: torch.Tensor | None, block: torch.nn.Module) -> None:
    """Keep a copy of the last ``K − 1`` inputs of the conv state the call starts from (the forward updates
    the cache in place) in ``record.raw["conv_context"]``; nothing without a state or with one tap. The
    block's ``conv1d`` is looked up only with a state: a pre-hook runs on every call, and a sub-module
    reached by attribute costs ``nn.Module.__getattr__`` about a microsecond."""
    if conv_state is None:
        return
    K = block.conv1d.weight.shape[-1]
    if K > 1:
        record.raw["conv_context"] = conv_state[..., -(K - 1) :].clone()


def activation_slope(name: str, u: torch.Tensor) -> torch.Tensor:
    """``act(u) / u`` for activations with ``act(0) = 0`` that are ``u`` times a smooth slope."""
    name = name.lower()
    if name in ("silu", "swish"):
        return torch.sigmoid(u)
    if name == "gelu":  # exact GeLU: u · Φ(u)
        return 0.5 * (1.0 + torch.erf(u / 2**0.5))
    if name == "relu":
        return (u > 0).to(u.dtype)
    if name in ("identity", "linear", "none"):
        return torch.ones_like(u)
    raise UnsupportedInputError(
        f"activation {name!r} after the conv is not supported; supported: silu, swish, gelu, relu, identity"
    )
