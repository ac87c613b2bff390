"""Launch settings of the fused kernels, swept on the dense read of one layer of each family.

Each variant is a change of ``kernels.TUNING`` (warps, register caps, programs an SM, store widths) or of the
tile size every kernel takes (``kernels.TILE``, 64 as shipped: ``"tiles of 32"``); it is
timed through the view (``view.dense()``, median of 5 synchronised reads after a warm-up that compiles;
with ``--bfloat16`` also stored in bfloat16, against half the floor; with ``--kernels`` also each kernel's
device time and the time of a read issued back to back with others) and compared with the default
setting's matrix, so that a faster setting is also shown to be the same matrix. Same models and widths as
``bench_gpu.py``; results as JSON lines and, with ``--out``, one file.

    python benchmarks/sweep_dense.py --repeat 3 --out sweep.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from bench_gpu import back_to_back, build, configs, record, timer, write_bandwidth
from profile_dense import kernels_of
from torch.profiler import ProfilerActivity, profile

from implicit_hooks import kernels

#: family → variant name → TUNING changes (``maxnreg`` entries merge into the default caps; ``TILE`` sets the
#: module's tile size instead)
VARIANTS = {
    "mamba": {
        "far uncapped": {"maxnreg": {"far": None}},
        "far 8 warps": {"far_warps": 8},
        "far 168 registers": {"maxnreg": {"far": 168}},
        "far 96 registers": {"maxnreg": {"far": 96}},
        "stores of 4": {"aligned_run": {"tiles": 4}},
        "prep 4 warps": {"prep_warps": 4},
        "prep 1 warp, 32 positions": {"prep_warps": 1, "prep_positions": 32},
        "prep 128 positions": {"prep_positions": 128},
        "prep uncapped": {"maxnreg": {"prep": None}},
        "prep 80 registers": {"maxnreg": {"prep": 80}},
        **{f"tiles of {t}": {"TILE": t} for t in (32, 128)},
    },
    "mamba2": {
        "head 8 warps": {"head_warps": 8},
        "head 8 warps, 128 registers": {"head_warps": 8, "maxnreg": {"head": 128}},
        "head regs 168": {"maxnreg": {"head": 168}},
        "head 4 programs/SM": {"head_programs_per_sm": 4},
        "head 1 program/SM": {"head_programs_per_sm": 1},
        "head stores of 16": {"aligned_run": {"head": 16}},
        **{f"tiles of {t}": {"TILE": t} for t in (32, 128)},
    },
    "rglru": {
        "far, near uncapped": {"maxnreg": {"far": None, "near": None}},
        "far 96 registers": {"maxnreg": {"far": 96}},
        "far 8 warps": {"far_warps": 8},
        "near 8 warps": {"near_warps": 8},
        "stores of 4": {"aligned_run": {"tiles": 4}},
        "prep 4 warps": {"prep_warps": 4},
        "prep 256 positions, 4 warps": {"prep_positions": 256, "prep_warps": 4},
        **{f"tiles of {t}": {"TILE": t} for t in (32, 128)},
    },
    "rwkv4": {
        "wkv uncapped": {"maxnreg": {"wkv": None}},
        "wkv 8 warps": {"wkv_warps": 8},
        "wkv 2 warps": {"wkv_warps": 2},
        "stores of 4": {"aligned_run": {"wkv": 4}},
        **{f"tiles of {t}": {"TILE": t} for t in (32, 128)},
    },
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``, channel by channel (no second full-size temporary)."""
    num = sum(float((a[:, c] - b[:, c]).double().square().sum()) for c in range(a.shape[1]))
    den = sum(float(b[:, c].double().square().sum()) for c in range(b.shape[1]))
    return (num / den) ** 0.5


def device_times(read, reads: int = 5) -> dict[str, float]:
    """Seconds per read of each device kernel of ``read`` (``torch.profiler``)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reads):
            read()
        torch.cuda.synchronize()
    return kernels_of(prof, reads, torch.device("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(VARIANTS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeat", type=int, default=1, help="passes over the variants, interleaved")
    parser.add_argument("--bfloat16", action="store_true", help="also time reads stored in bfloat16")
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants (and the default)")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="also each kernel's device time a read (torch.profiler) and "
        "the time of a read issued back to back with others",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    timed = timer(device)
    bandwidth = write_bandwidth(device, timed)
    default, default_tile = copy.deepcopy(kernels.TUNING), kernels.TILE
    rows = []
    for family, cfg in configs(False, 2).items():
        if family not in args.families:
            continue
        model = build(cfg, 2, device)
        for L in args.lengths:
            ids = torch.randint(0, 1024, (1, L), device=device)
            view = record(model, ids, layers=[0])[0].attention.with_backend("triton")
            narrow_view = view.with_output_dtype(torch.bfloat16)
            floor = view.shape[0] * view.shape[1] * L * L * 4 / bandwidth
            reference = view.dense()
            wanted = args.variants or list(VARIANTS[family])
            chosen = {k: v for k, v in VARIANTS[family].items() if k in wanted}
            named = {"default": {}, **chosen}.items()
            variants = [(p, *v) for p in range(args.repeat) for v in named]
            for repeat, name, change in variants:
                kernels.TUNING.clear()
                kernels.TUNING.update(copy.deepcopy(default))
                kernels.TILE = change.get("TILE", default_tile)
                for key, value in change.items():  # dictionaries (maxnreg, aligned_run) merge
                    if key != "TILE":
                        kernels.TUNING[key] = {**default[key], **value} if isinstance(value, dict) else value
                try:
                    seconds = timed(view.dense, 5)
                    error = relative(view.dense(), reference)
                    narrow = timed(narrow_view.dense, 5) if args.bfloat16 else None
                    kernel_s = device_times(view.dense) if args.kernels else None
                    pipelined = back_to_back(view.dense, device) if args.kernels else None
                except Exception as e:  # a setting this Triton rejects: reported, not fatal to the sweep
                    seconds, narrow, error = None, None, f"{type(e).__name__}: {str(e)[:200]}"
                    kernel_s = pipelined = None
                row = {"family": family, "L": L, "variant": name, "repeat": repeat, "s": seconds}
                row["floor_s"], row["vs_default_rel"] = floor, error
                row["over_floor"] = seconds / floor if seconds else None
                if kernel_s is not None:
                    row["kernels_s"], row["back_to_back_s"] = kernel_s, pipelined
                if narrow is not None:  # stored in bfloat16, against its own floor (half the bytes)
                    row["bf16_s"], row["bf16_over_floor"] = narrow, narrow / (floor / 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
            kernels.TUNING.clear()
            kernels.TUNING.update(copy.deepcopy(default))
            kernels.TILE = default_tile
            del view, narrow_view, reference
            torch.cuda.empty_cache()
        if args.out:
            meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": kernels.triton.__version__, "default": default}  # fmt: skip
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
