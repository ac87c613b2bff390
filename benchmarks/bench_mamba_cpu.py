"""CPU timings of Mamba-1 implicit attention: implicit_hooks against the nested-loop algorithm class of
the paper's released code (loops over row, column and the decay product).

    python benchmarks/bench_mamba_cpu.py            # writes benchmarks/results/mamba_cpu.{json,md}

One MambaMixer layer (C = 128 channels, N = 16 states), batch 1. The loop baseline is timed where it
finishes within --loop-budget seconds; beyond that its time is extrapolated from the measured cubic
(dense) or quadratic (row) growth and marked as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import MambaConfig, MambaModel

import implicit_hooks as ih

HERE = Path(__file__).parent


def loop_matrix(d: dict, rows: list[int]) -> torch.Tensor:
    """Rows of the S6 matrix the way the released code builds them: one decay product per (t, j) pair."""
    delta, A, B, C = d["delta"][0], d["A"], d["B"][0], d["C"][0]  # (C, L), (C, N), (L, N), (L, N)
    L = delta.shape[1]
    out = torch.zeros(delta.shape[0], len(rows), L)
    for i, t in enumerate(rows):
        for j in range(t + 1):
            prod = torch.ones_like(A)
            for k in range(j + 1, t + 1):
                prod = prod * torch.exp(delta[:, k, None] * A)
            out[:, i, j] = (prod * (delta[:, j, None] * B[j])) @ C[t]
    return out


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--loop-budget", type=float, default=30.0, help="seconds per loop measurement")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = MambaConfig(
        vocab_size=256, hidden_size=64, state_size=16, num_hidden_layers=1, intermediate_size=128
    )
    model = MambaModel(cfg).eval()
    results, loop_fit = [], {}
    for L in args.lengths:
        ids = torch.randint(0, 256, (1, L))
        with torch.no_grad(), ih.record(model) as rec:
            model(ids)
        record = rec[0]
        view = record.attention
        _ = view.factors  # derive once; the timings below are the assembly alone
        s6 = view.only("ssm")
        d = record.patcher.derive(record, torch.float32)
        row = {"L": L}
        with torch.no_grad():
            row["dense_s"] = timed(s6.dense)
            row["row_s"] = timed(lambda s6=s6: s6[0, :, -1])
            row["mean_s"] = timed(s6.mean)
            row["full_dense_s"] = timed(view.dense)
            for what, rows, power in (("loop_row_s", [L - 1], 2), ("loop_dense_s", list(range(L)), 3)):
                prev = loop_fit.get(what)
                predicted = prev[1] * (L / prev[0]) ** power if prev else 0.0
                if predicted <= args.loop_budget:
                    start = time.perf_counter()
                    reference = loop_matrix(d, rows)
                    row[what] = time.perf_counter() - start
                    loop_fit[what] = (L, row[what])
                    ours = view.only("ssm")[0, :, rows]
                    row[what.replace("_s", "_max_abs_diff")] = float((reference - ours).abs().max())
                else:
                    row[what] = predicted
                    row[what.replace("_s", "_extrapolated")] = True
        row["speedup_dense"] = row["loop_dense_s"] / row["dense_s"]
        row["speedup_row"] = row["loop_row_s"] / row["row_s"]
        results.append(row)
        print(json.dumps(row))
    meta = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "channels": 128,
        "state": 16,
        "batch": 1,
        "note": "S6-only matrix (the loop baseline builds only that); full_dense_s is G(R+D)ZM",
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "mamba_cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        "| L | dense (ours) | last row (ours) | channel mean (ours) | full G(R+D)ZM dense "
        "| dense (loops) | row (loops) | speed-up dense | speed-up row |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        star = {
            k: "*" if r.get(k.replace("_s", "_extrapolated")) else "" for k in ("loop_dense_s", "loop_row_s")
        }
        lines.append(
            f"| {r['L']} | {r['dense_s'] * 1e3:.1f} ms | {r['row_s'] * 1e3:.2f} ms "
            f"| {r['mean_s'] * 1e3:.1f} ms | {r['full_dense_s'] * 1e3:.1f} ms "
            f"| {r['loop_dense_s']:.2f} s{star['loop_dense_s']} "
            f"| {r['loop_row_s']:.3f} s{star['loop_row_s']} "
            f"| {r['speedup_dense']:.0f}× | {r['speedup_row']:.0f}× |"
        )
    lines.append(
        "\n`*` extrapolated from the largest measured length (cubic for dense, quadratic for a row)."
    )
    lines.append(f"\n{json.dumps(meta)}")
    (HERE / "results" / "mamba_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
