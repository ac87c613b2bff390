"""Regenerate the faithfulness tables and plots in docs/ (one command, with a progress bar).

    python benchmarks/faithfulness.py            # every shipped model, 128 samples each
    python benchmarks/faithfulness.py --n 32     # quicker

Writes docs/faithfulness.json, docs/faithfulness_table.md and docs/faithfulness_curves.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from implicit_hooks.faithfulness import benchmark

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="samples per model")
    parser.add_argument("--out", default=str(DOCS))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = benchmark.run(n=args.n)
    folder = benchmark.write(results, args.out)
    print((folder / "faithfulness_table.md").read_text())


if __name__ == "__main__":
    main()
