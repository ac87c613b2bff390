"""How fast can the fused kernels' output be written in the order they write it? Stores alone, no arithmetic.

The dense floor (``bench_gpu.py``) is the bytes of a read's output over the bandwidth of one large fill. The
kernels write ``(channels, L, L)`` float32 in 64 × 64 tiles, 16 bytes a store: each program one row tile
of one channel, its column tiles in turn (``kernels._far_kernel``). This script times that pattern with
nothing to compute (each tile a constant), and the same bytes in other orders, so that what separates a
kernel from the floor can be split into what its store order costs and what its arithmetic does:

* ``fill``: ``torch.Tensor.fill_`` (the floor's own measure);
* ``row tile a program``: the kernels' order, one program per row tile and channel, column tiles in turn;
* ``tile a program``: one program per tile;
* ``row strip a program``: 16 whole rows a program, 256 columns a store (each row's bytes in one run).

    python benchmarks/store_floor.py --out store_floor.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_kernel import cuda_time

TILE = 64


@triton.jit
def _row_tiles(out_ptr, L, value, Q: tl.constexpr):
    """Row tile ``program_id(0)`` of channel ``program_id(1)``, its column tiles in turn."""
    I = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    t = I * Q + tl.arange(0, Q)
    rows = out_ptr + (c * L + t[:, None]) * L
    tile = tl.full((Q, Q), value, tl.float32)
    for J in range(0, tl.cdiv(L, Q)):
        j = tl.multiple_of(J * Q, Q) + tl.arange(0, Q)
        tl.store(rows + j[None, :], tile, mask=(t < L)[:, None] & (j < L)[None, :])


@triton.jit
def _tiles(out_ptr, L, value, Q: tl.constexpr):
    """Tile ``(program_id(0), program_id(1))`` of channel ``program_id(2)``."""
    c = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * Q + tl.arange(0, Q)
    j = tl.program_id(1) * Q + tl.arange(0, Q)
    tile = tl.full((Q, Q), value, tl.float32)
    tl.store(out_ptr + (c * L + t[:, None]) * L + j[None, :], tile, mask=(t < L)[:, None] & (j < L)[None, :])


@triton.jit
def _row_strips(out_ptr, L, value, R: tl.constexpr, W: tl.constexpr):
    """``R`` whole rows of channel ``program_id(1)``, ``W`` columns a store."""
    c = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * R + tl.arange(0, R)
    rows = out_ptr + (c * L + t[:, None]) * L
    block = tl.full((R, W), value, tl.float32)
    for J in range(0, tl.cdiv(L, W)):
        j = tl.multiple_of(J * W, W) + tl.arange(0, W)
        tl.store(rows + j[None, :], block, mask=(t < L)[:, None] & (j < L)[None, :])


def ways(out: torch.Tensor) -> dict:
    """The writes of ``out`` (``(channels, L, L)`` float32) to time, by name."""
    nc, L, _ = out.shape
    nT = triton.cdiv(L, TILE)
    return {
        "fill": lambda: out.fill_(1.0),
        "row tile a program": lambda: _row_tiles[(nT, nc)](out, L, 1.0, Q=TILE, num_warps=4),
        "tile a program": lambda: _tiles[(nT, nT, nc)](out, L, 1.0, Q=TILE, num_warps=4),
        "row strip a program": lambda: _row_strips[(triton.cdiv(L, 16), nc)](
            out, L, 1.0, R=16, W=256, num_warps=4
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for L in args.lengths:
        out = torch.empty(args.channels, L, L, device="cuda")
        for name, write in ways(out).items():
            seconds = cuda_time(write)
            assert bool((out == 1.0).all()), name  # every entry written
            out.zero_()
            row = {"L": L, "channels": args.channels, "way": name, "s": seconds}
            row["TB_s"] = out.numel() * 4 / seconds / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
        del out
        torch.cuda.empty_cache()
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        meta["triton"] = triton.__version__
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
