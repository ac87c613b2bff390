"""What the host spends issuing one dense read: Python and torch glue against Triton's launches.

A lone short read is issued by the host for about as long as the device runs it (``profile_dense.py``).
This splits the issue time (from the call until the read returns, the device idle before it) three ways,
each the median of ``--reads`` synchronised reads of one layer; ``--read mean`` times the channel mean
(``view.mean()``) in place of the dense read (run TT: RG-LRU's mean took 0.36 ms of kernels at L = 512 and
0.64–0.91 ms a read back to back, its host issue the larger part):

- ``whole_us``: the read as shipped;
- ``glue_us``: the same read with every kernel launch replaced by a no-op (allocations, views, checks,
  the factors' glue: everything but the launches);
- ``launches_us``: the read's own launches replayed alone, with the arguments they were given (Triton's
  binding, specialisation and launch of each).

``whole_us − glue_us − launches_us`` is noise of either sign. Same models and widths as ``bench_gpu.py``.
With ``--launch-parts`` (CUDA, Triton 3.4–3.6's ``JITFunction.run``), each launch of the read is split
further (``launch_parts``, medians of 300 calls, the device idle at each): the whole
``kernel[grid](...)``, Triton's binding and specialisation of the arguments (``binder_us``), its cache key
(``key_us``), the compiled kernel's launcher alone (``launcher_us``), and ``rest_us``, what ``run``
spends besides (its knobs, dictionaries and checks).

    python benchmarks/host_issue.py --out host_issue.json     # on the GPU machine
    python benchmarks/host_issue.py --read mean --families rglru mamba --out host_issue_mean.json
    python benchmarks/host_issue.py --families mamba --lengths 512 --launch-parts
    python benchmarks/host_issue.py --smoke                   # tiny shapes, interpreted kernels on CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported: launches go through its interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from bench_gpu import issue_seconds, one_layer_views

from implicit_hooks import kernels

KERNELS = [name for name in dir(kernels) if name.startswith("_") and name.endswith("_kernel")]


class _Launches:
    """Stands in for every kernel while installed: ``run=False`` drops each launch, else launches it and
    keeps ``(kernel, grid, args, kwargs)`` for a replay."""

    def __init__(self, run: bool):
        self.run, self.calls, self.saved = run, [], {}

    def __enter__(self) -> _Launches:
        for name in KERNELS:
            self.saved[name] = real = getattr(kernels, name)
            setattr(kernels, name, _Stand(real, self))
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self.saved.items():
            setattr(kernels, name, real)


class _Stand:
    """One kernel while :class:`_Launches` is installed: ``kernel[grid](...)`` goes through its owner."""

    def __init__(self, real, owner: _Launches):
        self.real, self.owner = real, owner

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.owner.run:
                self.owner.calls.append((self.real, grid, args, kwargs))
                self.real[grid](*args, **kwargs)

        return launch


def _issue_us(fn) -> float:
    """Median µs of 300 calls of ``fn``, the device idle at each (a launch queued behind others may wait
    for room in the device's queue: not the host's cost)."""
    return 1e6 * issue_seconds(fn, torch.device("cuda"), 300)


def launch_parts(kernel, grid, args: tuple, kwargs: dict) -> dict:
    """Where one launch ``kernel[grid](*args, **kwargs)`` spends the host's time: the steps of Triton's
    ``JITFunction.run`` taken one at a time (Triton 3.4–3.6; ``rest_us`` is the whole less the parts)."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import compute_cache_key

    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    kernel_cache, key_cache, _, _, binder = kernel.device_caches[device]
    given = {
        **kwargs,
        "debug": kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
    }  # as run() passes them
    bound, specialization, options = binder(*args, **given)
    compiled = kernel_cache[compute_cache_key(key_cache, specialization, options)]
    values = list(bound.values())
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]

    def launcher():
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)  # fmt: skip

    parts = {
        "kernel": kernel.__name__,
        "arguments": len(args) + len(kwargs),
        "whole_us": _issue_us(lambda: kernel[grid](*args, **kwargs)),
        "binder_us": _issue_us(lambda: binder(*args, **given)),
        "key_us": _issue_us(lambda: compute_cache_key(key_cache, specialization, options)),
        "launcher_us": _issue_us(launcher),
    }
    parts["rest_us"] = parts["whole_us"] - parts["binder_us"] - parts["key_us"] - parts["launcher_us"]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--families", nargs="+", default=["mamba", "mamba2", "rglru", "rwkv4"])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--reads", type=int, default=60)
    parser.add_argument("--read", choices=["dense", "mean"], default="dense", help="which read to time")
    parser.add_argument("--bfloat16", action="store_true", help="dense reads stored in bfloat16")
    parser.add_argument("--launch-parts", action="store_true", help="split each launch (CUDA)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.launch_parts and args.smoke:
        parser.error("--launch-parts times compiled launches: a CUDA device, not --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    lengths = args.lengths or ([48] if args.smoke else [512, 2048])
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for family, L, view in one_layer_views(args.families, lengths, device, args.smoke, "triton"):
        read = view.mean
        if args.read == "dense":
            read = functools.partial(view.dense, torch.bfloat16) if args.bfloat16 else view.dense
        read()  # compiled for this read
        whole = 1e6 * issue_seconds(read, device, args.reads)
        with _Launches(run=False):
            glue = 1e6 * issue_seconds(read, device, args.reads)
        with _Launches(run=True) as launches:
            read()
        calls = launches.calls

        def replay(calls=calls):
            for kernel, grid, a, k in calls:
                kernel[grid](*a, **k)

        row = {
            "family": family,
            "L": L,
            "read": args.read + (" bfloat16" if args.bfloat16 and args.read == "dense" else ""),
            "whole_us": whole,
            "glue_us": glue,
            "launches_us": 1e6 * issue_seconds(replay, device, args.reads),
            "launches": [len(a) + len(k) for _, _, a, k in calls],  # arguments of each
        }
        if args.launch_parts:
            row["launch_parts"] = [launch_parts(kernel, grid, a, k) for kernel, grid, a, k in calls]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del view, read, calls
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "triton": kernels.triton.__version__}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
