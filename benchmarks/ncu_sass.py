"""Where a kernel's warps wait, by stretches of its SASS: a summary of Nsight Compute's source page.

``ncu`` samples, for every instruction, why warps were stalled on it. Triton kernels inline every helper,
so the samples are read by stretches of instructions: ``--regions`` names them by their first instruction
(e.g. where the far tiles' loop, the strips' products and the direct blocks begin, found with
``--windows``, which prints the share of samples and the commonest opcodes of every window of instructions).
Per region: its share of the samples, the warp instructions it executed and its commonest stall reasons;
then the instructions that hold the most samples.

    ncu --clock-control none -k regex:_far_kernel --launch-skip 2 --launch-count 1 --set full \\
        --import-source yes -o far python3 read.py
    ncu --import far.ncu-rep --page source --csv --print-source sass > far_sass.csv
    python benchmarks/ncu_sass.py far_sass.csv --windows 40
    python benchmarks/ncu_sass.py far_sass.csv --regions setup:0 far:360 strips:1160 direct:1720 end:2240
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def load(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """The stall columns and one row per instruction (``ncu``'s CSV: a kernel line, then the header)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, row in enumerate(rows) if row and row[0] == "Address")
    header = rows[start]
    stalls = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    return stalls, [dict(zip(header, row)) for row in rows[start + 1 :] if len(row) == len(header)]


def opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):  # a predicate
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def summary(stalls: list[str], rows: list[dict[str, str]], total: float) -> dict:
    samples = sum(number(r[SAMPLES]) for r in rows)
    reasons = {s[len("stall_") :]: sum(number(r[s]) for r in rows) for s in stalls}
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:5]
    return {
        "samples_share": samples / total,
        "warp_instructions": sum(number(r[EXECUTED]) for r in rows),
        "stalls": {k: round(v / max(samples, 1), 3) for k, v in top},
        "opcodes": dict(Counter(opcode(r["Source"]) for r in rows).most_common(5)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--regions", nargs="*", default=[], help="name:first_instruction, in order")
    parser.add_argument("--windows", type=int, default=0, help="also every window of this many instructions")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    stalls, rows = load(args.csv)
    total = sum(number(r[SAMPLES]) for r in rows) or 1.0
    result = {"instructions": len(rows), "samples": total, "whole": summary(stalls, rows, total)}
    if args.windows:
        for i in range(0, len(rows), args.windows):
            part = summary(stalls, rows[i : i + args.windows], total)
            executed = part["warp_instructions"] / 1e6
            print(f"{i:6d} {part['samples_share']:6.1%} {executed:8.2f} M  {part['opcodes']}")
    if args.regions:
        bounds = [(name, int(first)) for name, first in (r.split(":") for r in args.regions)]
        ends = [first for _, first in bounds[1:]] + [len(rows)]
        result["regions"] = {
            name: summary(stalls, rows[first:end], total) for (name, first), end in zip(bounds, ends)
        }
    hot = sorted(range(len(rows)), key=lambda i: -number(rows[i][SAMPLES]))[: args.top]
    result["hottest"] = [
        {
            "index": i,
            "sass": rows[i]["Source"].strip(),
            "samples_share": number(rows[i][SAMPLES]) / total,
            "stall": max(stalls, key=lambda s: number(rows[i][s]))[len("stall_") :],
        }
        for i in hot
    ]
    print(json.dumps({k: v for k, v in result.items() if k != "hottest"}, indent=1))
    for h in result["hottest"]:
        print(f"{h['index']:6d} {h['samples_share']:5.1%} {h['stall']:14s} {h['sass'][:70]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
