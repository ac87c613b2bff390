"""Checks shared by the family test modules (each family's maths is tested in its own module)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def reads_are_bounded(view) -> bool:
    """A last-token row asks the core for one row; a channel mean never for more than one tile
    (raises with the details otherwise)."""
    view = view.with_backend("torch")  # the fused kernels never call core.block (tests/test_kernels.py)
    core = view.factors.core
    asked = []
    original = core.block

    def spy(b, chans, rows, cols, **kw):
        asked.append((len(chans), len(rows), len(cols)))
        return original(b, chans, rows, cols, **kw)

    core.block = spy
    try:
        view[0, :, -1]
        assert {r for _, r, _ in asked} == {1}
        asked.clear()
        view.mean()
        assert max(c * r * k * core.work_per_entry for c, r, k in asked) <= view.tile_elements
    finally:
        del core.block
    return True


def cuda_syncs(fn: Callable[[], object]) -> int:
    """How many synchronising CUDA operations ``fn`` performs (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)
