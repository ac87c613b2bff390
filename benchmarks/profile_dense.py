"""Where the time of one dense read goes: ``view.dense()`` of one layer under ``torch.profiler``.

For each family and length: the wall time of a read, the time the host takes to issue it (``host_s``: until
``dense()`` returns, which never waits for the device), the time the device is busy during it (the sum of
its kernels), and the kernels that take it, so that short-L overheads (preparation, torch glue, launch
gaps) can be told apart from the fused kernel's own time. Same models and widths as ``bench_gpu.py``.

    python benchmarks/profile_dense.py --out profile.json     # on the GPU machine
    python benchmarks/profile_dense.py --smoke                # tiny shapes on CPU: checks that it runs
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
from collections import defaultdict
from pathlib import Path

import torch
from bench_gpu import issue_seconds, once, one_layer_views
from torch.profiler import ProfilerActivity, profile


def kernels_of(prof: profile, reads: int, device: torch.device) -> dict[str, float]:
    """Seconds per read of each device kernel (CPU ops on CPU), largest first."""
    total: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if device.type == "cuda":
            seconds = event.self_device_time_total * 1e-6
            if seconds > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
                total[event.key[:100]] += seconds / reads
        elif event.self_cpu_time_total > 0:
            total[event.key] += event.self_cpu_time_total * 1e-6 / reads
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def host_functions(read, reads: int, top: int) -> dict[str, list[float]]:
    """``[own seconds, cumulative seconds]`` per read of the ``top`` functions with the most own time, under
    ``cProfile`` (which slows Python down: compare them with each other, not with ``host_s``)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reads):
        read()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) → (calls, primitive calls, own, cumulative, …)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        f"{Path(file).name}:{line}({name})": [own / reads, cumulative / reads]
        for (file, line, name), (_, _, own, cumulative, _) in rows
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--families", nargs="+", default=["mamba", "mamba2", "rglru", "rwkv4"])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--reads", type=int, default=3)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--python", type=int, default=0, help="also the N costliest Python functions")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    lengths = args.lengths or ([48] if args.smoke else [512, 2048])
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for family, L, view in one_layer_views(args.families, lengths, device, args.smoke):
        wall = sorted(once(view.dense, device) for _ in range(args.reads))[args.reads // 2]
        host = issue_seconds(view.dense, device, args.reads)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.reads):
                view.dense()
            if device.type == "cuda":
                torch.cuda.synchronize()
        per_kernel = kernels_of(prof, args.reads, device)
        python = host_functions(view.dense, args.reads, args.python) if args.python else None
        row = {
            "family": family,
            "L": L,
            "wall_s": wall,
            "host_s": host,
            "busy_s": sum(per_kernel.values()),
            "top": dict(list(per_kernel.items())[: args.top]),
        }
        if python is not None:
            row["host_functions"] = python
        rows.append(row)
        print(json.dumps(row), flush=True)
        del view
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
