"""Checks shared by the family test modules (each family's maths is tested in its own module)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch


def reads_are_bounded(view) -> bool:
    """A last-token row asks the core for one row; a channel mean never for more than one tile
    (raises with the details otherwise)."""
    view = view.with_backend("torch")  # the fused kernels never call core.block (tests/test_kernels.py)
    core = view.factors.core
    asked = []
    block, block_range = core.block, core.block_range

    def spy(b, chans, rows, cols, **kw):
        asked.append((len(chans), len(rows), len(cols)))
        return block(b, chans, rows, cols, **kw)

    def spy_range(b, chans, rows, c0, c1, **kw):
        asked.append((len(chans), len(rows), c1 - c0))
        return block_range(b, chans, rows, c0, c1, **kw)

    core.block, core.block_range = spy, spy_range
    try:
        view[0, :, -1]
        assert {r for _, r, _ in asked} == {1}
        asked.clear()
        view.mean()
        assert max(c * r * k * core.work_per_entry for c, r, k in asked) <= view.tile_elements
    finally:
        del core.block, core.block_range
    return True


#: operators that read a device tensor back to the host (a synchronisation on CUDA)
READ_BACKS = frozenset({"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive"})


def rows_read_nothing_back(view) -> bool:
    """Rows, blocks of rows, lists and ``apply`` on the torch path never read the device back (the parsing
    of indices aside), so reading the last rows of every layer queues work without waiting."""
    view = view.with_backend("torch")
    B, C, L, _ = view.shape
    reads = {
        "last row": lambda: view[0, :, -1],
        "rows": lambda: view[B - 1, 1:3, L - 5 :, 2 : L - 1],
        "lists": lambda: view[0, [0, C - 1], [L - 1, 1], :],
        "apply": view.output,
    }
    found = {name: device_read_backs(read) for name, read in reads.items()}
    assert not any(found.values()), found
    return True


def device_read_backs(fn: Callable[[], object]) -> list[str]:
    """Where ``fn`` reads a tensor's values back to the host (``.item()``, ``int(t)``, ``bool(t)``,
    ``nonzero``, ``unique``), as ``"file:line"`` of the implicit_hooks frame that asked: on CUDA each is a
    wait for the device. Counted on any device, so that the CPU suite can say what torch's CUDA sync debug
    mode (:func:`cuda_syncs`) says on the GPU. The parsing of indices is left out: it reads the CPU copy of
    an index by design (``view._parse_index``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in READ_BACKS:
                frame, ours = sys._getframe(1), []
                while frame is not None:
                    if "implicit_hooks" in frame.f_code.co_filename:
                        ours.append(frame)
                    frame = frame.f_back
                if ours and not any(f.f_code.co_name in ("_parse_index", "_span") for f in ours):
                    code = ours[0].f_code
                    self.seen.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{ours[0].f_lineno}")
            return func(*args, **(kwargs or {}))

    with Watch() as watch:
        fn()
    return watch.seen


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
