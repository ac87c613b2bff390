"""The fused Mamba-1 kernel alone (implicit_hooks/kernels.py): preparation, dense tiles and the channel
reduction of one 130M-class layer (1536 channels, N = 16), for each code path of ``kernels.TUNING``,
against the floor set by writing the output.

    python benchmarks/bench_kernel.py          # on the GPU: writes benchmarks/results/kernel.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

import implicit_hooks as ih
from implicit_hooks import kernels

HERE = Path(__file__).parent
#: the settings compared: changes to ``kernels.TUNING`` read at launch (the first, none, is the default: far
#: products as split TF32, near tiles by strips; ``FAR_DOT`` is read when the tiles are prepared, so it is
#: not among them)
VARIANTS = {
    "default": {},
    "ieee": {"FAR_SPLIT_TF32": False},
    "nostrips": {"NEAR_STRIPS": False},
    "ieee_nostrips": {"FAR_SPLIT_TF32": False, "NEAR_STRIPS": False},
    "far_w8": {"far_warps": 8},
    "near_w8": {"near_warps": 8},
    "near_w2": {"near_warps": 2},
}


def cuda_time(fn, repeat: int = 5) -> float:
    """Median seconds of ``fn()`` between CUDA events, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def write_bandwidth(device: torch.device) -> float:
    """Bytes per second the device writes (a fill of 4 GiB)."""
    fill = torch.empty(1 << 30, device=device)
    return fill.numel() * 4 / cuda_time(lambda: fill.fill_(1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--out", default=str(HERE / "results" / "kernel.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = write_bandwidth(device)
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=1024, hidden_size=args.channels // 2, intermediate_size=args.channels, state_size=16,
        num_hidden_layers=2,
    )  # fmt: skip
    model = transformers.MambaForCausalLM(cfg).to(device).eval()
    meta = {"device": torch.cuda.get_device_name(), "write_bandwidth_bytes_per_s": bandwidth,
            "torch": torch.__version__, "triton": kernels.triton.__version__}  # fmt: skip
    rows = []
    default = dict(kernels.TUNING)
    for L in args.lengths:
        ids = torch.randint(0, 1024, (1, L), device=device)
        with torch.no_grad(), ih.record(model, layers=[0]) as rec:
            model(ids)
        view = rec[0].attention.with_backend("triton")
        chans = torch.arange(args.channels, device=device)
        C = args.channels
        floor = C * L * L * 4 / bandwidth
        out = torch.empty(C, L, L, device=device)
        row = {"L": L, "channels": C, "floor_s": floor}
        for name, v in (("full", view), ("s6", view.only("ssm"))):
            row[f"{name}_prep_s"] = cuda_time(lambda v=v, chans=chans: v._fused_tiles(0, chans))
            tiles = v._fused_tiles(0, chans)
            if tiles.strips:
                row[f"{name}_strips_factorised_share"] = float(
                    (tiles.growth <= kernels.STRIP_GROWTH).float().mean()
                )
            for variant, change in VARIANTS.items() if name == "full" else [("default", {})]:
                kernels.TUNING.update(default)
                kernels.TUNING.update(change)
                key = f"{name}_{variant}"
                seconds = cuda_time(lambda tiles=tiles, L=L, out=out: tiles.dense(0, L, 0, L, out=out))
                row[key + "_s"], row[key + "_over_floor"] = seconds, seconds / floor
                if variant == "default":
                    first = out[:32].clone()  # the default's entries, to compare the other settings with
                else:
                    row[key + "_vs_default_rel"] = float((out[:32] - first).norm() / first.norm())
                if name == "full" and L <= 1024 and variant in ("default", "nostrips"):
                    row[key + "_mean_s"] = cuda_time(lambda tiles=tiles, L=L: tiles.reduce(0, L, 0, L), 1)
            del tiles
        kernels.TUNING.update(default)
        print(json.dumps(row), flush=True)
        rows.append(row)
        # after every length: a run cut short by a time limit keeps what it measured
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        del out, rec, view
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
