"""The ``implicit-hooks`` command line: ``demo`` and ``explain``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ImplicitHooksError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicit-hooks", description="Exact implicit attention of attention-free models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain a built-in model: exactness per layer and a report folder")
    demo.add_argument("--family", default="mamba", help="family of the shipped model (default: %(default)s)")
    demo.add_argument("--task", default="markers", help="task it was trained on (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="which task sample to explain")
    demo.add_argument(
        "--random", action="store_true", help="a wider random byte-level Mamba on --text instead"
    )
    demo.add_argument("--text", default="Attention-free models attend too: every gate and decay is a matrix.")
    demo.add_argument("--layers", type=int, default=4, help="layers of the --random model")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--out", default="implicit_hooks_report", help="report folder (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true")
    explain = sub.add_parser("explain", help="explain a local Hugging Face model directory on a text")
    explain.add_argument("model", help="a local model directory (config.json and weights)")
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the input text (needs a tokenizer in the model directory)")
    source.add_argument("--ids", help="comma-separated token ids, e.g. 5,17,3")
    explain.add_argument("--query", type=int, default=-1, help="position to explain (default: last)")
    explain.add_argument("--target", type=int, default=None, help="logit index (default: predicted)")
    explain.add_argument("--device", default="cpu")
    explain.add_argument(
        "--out", default="implicit_hooks_report", help="report folder (default: %(default)s)"
    )
    explain.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(
                family=args.family,
                task=args.task,
                seed=args.seed,
                random=args.random,
                text=args.text,
                layers=args.layers,
                device=args.device,
                out=args.out,
                show_progress=not args.no_progress,
            )
        return _explain(args)
    except (ImplicitHooksError, FileNotFoundError) as err:
        print(f"implicit-hooks: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # an optional dependency: name the extra that brings it
        name = (getattr(err, "name", None) or "").split(".")[0]
        extra = {"matplotlib": "viz", "transformers": "hf", "rwkv": "rwkv"}.get(name)
        if "implicit_hooks[" in str(err):
            print(f"implicit-hooks: error: {err}", file=sys.stderr)
        elif extra is not None:
            print(
                f"implicit-hooks: error: this needs {name}: pip install 'implicit_hooks[{extra}]'",
                file=sys.stderr,
            )
        else:
            raise
        return 2


def _explain(args: argparse.Namespace) -> int:

    from .report import build_report

    path = Path(args.model)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return _explain_rwkv_checkpoint(path, args)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(args.device).eval()
    if args.text is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"{path} has no usable tokenizer ({err}); pass --ids instead of --text"
            ) from err
        ids = tokenizer(args.text, return_tensors="pt").input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    else:
        ids, tokens = _parse_ids(args.ids)
    index = build_report(
        model,
        {"input_ids": ids.to(args.device)},
        tokens,
        args.out,
        query=args.query,
        target=args.target,
        show_progress=not args.no_progress,
        title=f"implicit_hooks: {path.name}",
    )
    print(index)
    return 0


def _explain_rwkv_checkpoint(path: Path, args: argparse.Namespace) -> int:
    """A checkpoint of the ``rwkv`` package: raw attention and rollout (the package runs without
    gradients, so gradient-weighted methods do not apply)."""
    import torch

    from .families.rwkv_pkg import RwkvLM, load_checkpoint
    from .report import build_report

    if path.suffix != ".pth":
        raise FileNotFoundError(
            f"{path} is a file but not an rwkv checkpoint (.pth); explain takes a Hugging Face model "
            "directory (with config.json) or an rwkv package checkpoint"
        )
    strategy = "cuda fp32" if args.device.startswith("cuda") else "cpu fp32"
    try:
        model = RwkvLM(load_checkpoint(path, strategy))
    except Exception as err:  # the package raises bare errors for files it cannot read
        raise ImplicitHooksError(f"cannot load {path} as an rwkv checkpoint: {err}") from err
    if args.text is not None:
        ids = torch.tensor([model.tokenizer().encode(args.text)])
        tokens = [model.tokenizer().decode([i]) for i in ids[0].tolist()]
    else:
        ids, tokens = _parse_ids(args.ids)
    index = build_report(
        model,
        {"input_ids": ids},
        tokens,
        args.out,
        query=args.query,
        target=args.target,
        methods=("raw", "rollout"),
        show_progress=not args.no_progress,
        title=f"implicit_hooks: {path.name}",
    )
    print(index)
    return 0


def _parse_ids(text: str):
    import torch

    try:
        ids = torch.tensor([[int(i) for i in text.split(",")]])
    except ValueError as err:
        raise ImplicitHooksError(f"--ids must be comma-separated integers, got {text!r}") from err
    return ids, [str(i) for i in ids[0].tolist()]


if __name__ == "__main__":
    sys.exit(main())
