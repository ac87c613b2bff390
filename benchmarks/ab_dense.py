"""A/B of dense reads between two versions of the package, each timed in its own process.

Kernel changes that keep the matrices (a load moved, a loop regrouped) are measured against the code
before them. Each version runs as its own process. Alternate the two versions and make two passes:
machines of one kind differ by a few per cent, so compare figures only within one run.

    git archive REV implicit_hooks benchmarks | tar -x -C /tmp/before     # the code before
    for p in 1 2; do
      PYTHONPATH=/tmp/before python benchmarks/ab_dense.py before$p out --families mamba rglru
      python benchmarks/ab_dense.py after$p out --families mamba rglru
    done
    python benchmarks/ab_dense.py out --compare before1 after1           # the same matrices?

Each process reads the first layer of ``bench_gpu.py``'s models, one family and length after another. It
records:

- a lone read (median of 9 synchronised reads);
- reads issued back to back (3 × 20);
- each kernel's device time per read (``torch.profiler``);
- a channel mean's time: a lone one (median of 5), back to back (3 × 10) and by kernel (the lone mean
  of a short read is mostly the host's issue: its kernels say what the device spent).

Read and back-to-back times are given against the write floor (``--bfloat16``: reads stored in bfloat16,
against half of it). The package is whichever ``implicit_hooks`` comes first on ``PYTHONPATH``; its path is
printed with every row. The first channels of the dense matrix at L ≤ 1024, and the channel mean's last
64 × 64 entries at every length, are saved for ``--compare``, which prints how far apart two labels'
matrices are. JSON lines on stdout, and ``OUT/ab_LABEL.json``. ``sweep_nn.json`` to ``sweep_rr.json`` hold
such runs. ``--smoke`` runs tiny shapes on the CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch
from bench_gpu import back_to_back, once, one_layer_views, timer, write_bandwidth

import implicit_hooks


def measure(label: str, out: str, families: list[str], lengths: list[int], smoke: bool,
            dtype: torch.dtype = torch.float32) -> list[dict]:  # fmt: skip
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth = write_bandwidth(device, timer(device))
    # reads a timing takes (lone: the median of; back to back: a round of); --smoke: the fewest that still
    # exercise every path (the test suite runs it four times: 20 reads a round took it 5 minutes)
    lone_reads, mean_reads, b2b_reads = (3, 3, 2) if smoke else (9, 5, 20)
    rows = []
    for family, L, view in one_layer_views(families, lengths, device, smoke):
        B, C = view.shape[:2]
        floor = B * C * L * L * dtype.itemsize / bandwidth

        def read(view=view):
            return view.dense(dtype)

        lone = sorted(once(read, device) for _ in range(lone_reads))[lone_reads // 2]
        b2b = sorted(back_to_back(read, device, b2b_reads) for _ in range(3))
        kernels, mean_kernels = {}, {}
        if device.type == "cuda":
            from sweep_dense import device_times

            kernels = {k[:40]: v for k, v in device_times(read, 5).items()}
            mean_kernels = {k[:40]: v for k, v in device_times(view.mean, 5).items()}
        mean = view.mean()
        mean_s = sorted(once(view.mean, device) for _ in range(mean_reads))[mean_reads // 2]
        mean_b2b_s = sorted(back_to_back(view.mean, device, b2b_reads // 2) for _ in range(3))
        row = dict(label=label, family=family, pkg=implicit_hooks.__file__, L=L, dtype=str(dtype)[6:],
                   floor=floor, lone=lone / floor, b2b=[x / floor for x in b2b], b2b_s=b2b, mean_s=mean_s,
                   mean_b2b_s=mean_b2b_s, kernels=kernels, mean_kernels=mean_kernels)  # fmt: skip
        torch.save(mean[-64:, -64:].cpu().clone(), os.path.join(out, f"{family}{L}mean_{label}.pt"))
        if L <= 1024:  # the first channels, for --compare
            n = 64 if L <= 512 else 8
            first = (view[0, :n] if dtype == torch.float32 else view.dense(dtype)[0, :n]).cpu().clone()
            torch.save(first, os.path.join(out, f"{family}{L}_{label}.pt"))
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(out, f"ab_{label}.json"), "w") as f:
        json.dump(rows, f)
    return rows


def compare(out: str, first: str, second: str) -> dict:
    """``{family and length: relative and largest absolute difference, whether bit for bit the same}``."""
    result = {}
    for path in sorted(glob.glob(os.path.join(out, f"*_{first}.pt"))):
        other = path[: -len(f"_{first}.pt")] + f"_{second}.pt"
        if not os.path.exists(other):
            continue
        a, b = torch.load(path), torch.load(other)
        key = os.path.basename(path)[: -len(f"_{first}.pt")]
        result[key] = dict(rel=float((a - b).norm() / a.norm().clamp_min(1e-30)),
                           maxabs=float((a - b).abs().max()), same=bool(torch.equal(a, b)))  # fmt: skip
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", nargs="?", help="this version's label (and pass), e.g. before1")
    parser.add_argument("out", help="the folder for the rows and the saved matrices")
    parser.add_argument("--families", nargs="+", default=["mamba", "rglru"])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument(
        "--compare", nargs=2, metavar=("FIRST", "SECOND"), help="compare two labels' matrices"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--bfloat16", action="store_true", help="reads stored in bfloat16 (against half the floor)"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.compare:
        compare(args.out, *args.compare)
        return
    if not args.label:
        parser.error("a label, or --compare FIRST SECOND")
    lengths = args.lengths or ([16, 80] if args.smoke else [512, 1024, 2048])
    dtype = torch.bfloat16 if args.bfloat16 else torch.float32
    measure(args.label, args.out, args.families, lengths, args.smoke, dtype)


if __name__ == "__main__":
    main()
