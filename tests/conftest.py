import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

if not torch.cuda.is_available():
    # Triton's interpreter runs the fused kernels on CPU tensors (tests/test_kernels.py, backend="triton"
    # only). Triton reads this when a kernel is defined: before implicit_hooks.kernels is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.4) -> torch.nn.Module:
    """Replace HF's tiny initial weights by O(1) random ones so every factor matters (A_log kept)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                continue
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def cache_kwarg(model) -> str:
    """transformers renamed `cache_params` to `cache` in 5.2x; tests run on both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "cache_params"


def output_cache(out):
    return getattr(out, "cache", None) or getattr(out, "cache_params", None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
