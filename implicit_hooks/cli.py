"""The ``implicit-hooks`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="implicit-hooks", description="Exact implicit attention of attention-free models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="record the built-in model and print the exactness of every layer's matrix"
    )
    demo.add_argument("--text", default="Attention-free models attend too: every gate and decay is a matrix.")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(text=args.text, device=args.device, layers=args.layers)
    return 2


if __name__ == "__main__":
    sys.exit(main())
