"""Tiny models trained on the tasks, shipped inside the package (safetensors + their HF config).

``load(family, task)`` rebuilds the transformers model from its saved config and weights; no download.
``benchmarks/train_tiny.py`` trains them (seeded, CPU, minutes each) and writes ``weights/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = Path(__file__).parent / "weights"

#: family → (transformers config class, model class, config keyword arguments of the tiny model)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        dict(
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            intermediate_size=64,
            conv_kernel=4,
            time_step_rank=4,
        ),
    ),
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        dict(
            hidden_size=32,
            num_heads=4,
            head_dim=16,
            expand=2,
            state_size=16,
            n_groups=1,
            num_hidden_layers=2,
            chunk_size=16,
            conv_kernel=4,
        ),
    ),
    "rglru": (  # RecurrentGemma with recurrent blocks only; its cache needs an attention block, so none
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            lru_width=32,
            attention_window_size=16,
            block_types=["recurrent", "recurrent"],
            use_cache=False,
        ),
    ),
    "rwkv4": (
        "RwkvConfig",
        "RwkvForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            attention_hidden_size=32,
            intermediate_size=64,
            context_length=64,
        ),
    ),
}


def build(family: str, vocab_size: int, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of ``family``."""
    import transformers

    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    config_name, model_name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(vocab_size=vocab_size, **kwargs)
    return getattr(transformers, model_name)(config)


def available() -> list[tuple[str, str]]:
    """``(family, task)`` pairs whose weights ship with the package."""
    return sorted(tuple(p.stem.split("__")) for p in WEIGHTS.glob("*__*.safetensors"))  # type: ignore[misc]


def metadata(family: str, task: str) -> dict[str, Any]:
    """The training record of a shipped model: task options, steps, held-out accuracy, seed."""
    return json.loads((WEIGHTS / f"{family}__{task}.json").read_text())


def load(family: str, task: str) -> nn.Module:
    """The shipped model trained on ``task``, in eval mode."""
    import transformers
    from safetensors.torch import load_file

    path = WEIGHTS / f"{family}__{task}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no shipped model for {family!r} on {task!r}; available: {available()}")
    meta = metadata(family, task)
    config = getattr(transformers, meta["config_class"])(**meta["config"])
    model = getattr(transformers, meta["model_class"])(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def save(model: nn.Module, family: str, task: str, info: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    WEIGHTS.mkdir(exist_ok=True)
    config = model.config.to_diff_dict()
    config.pop("transformers_version", None)
    meta = {
        "config_class": type(model.config).__name__,
        "model_class": type(model).__name__,
        "config": config,
    }
    meta.update(info)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # tied weights too
    path = WEIGHTS / f"{family}__{task}.safetensors"
    save_file(state, str(path))
    (WEIGHTS / f"{family}__{task}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path
