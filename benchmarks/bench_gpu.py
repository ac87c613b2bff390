"""The GPU figures of the performance issue in one run: recording overhead, dense assembly against the
floor set by writing its output, last-token rows of every layer, and the channel mean's peak memory,
for Mamba, Mamba-2, RG-LRU and RWKV-4 models of 24 layers at real widths, random weights.

    python benchmarks/bench_gpu.py                # on the GPU machine: writes benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --smoke        # tiny shapes on CPU: checks that the script runs

Not yet here (next steps of the issue): the side-by-side with TransformerLens and a Triton kernel.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import implicit_hooks as ih

HERE = Path(__file__).parent


def configs(smoke: bool) -> dict[str, transformers.PretrainedConfig]:
    """The issue's shapes (or tiny ones): 24 layers, batch-1 widths of the 130M-class models."""
    layers = 2 if smoke else 24
    w = 1 / 48 if smoke else 1.0

    def width(n: int, multiple: int = 16) -> int:
        return max(multiple, int(n * w) // multiple * multiple)

    return {
        "mamba": transformers.MambaConfig(
            vocab_size=1024,
            hidden_size=width(768),
            intermediate_size=width(1536),
            state_size=16,
            num_hidden_layers=layers,
        ),
        "mamba2": transformers.Mamba2Config(
            vocab_size=1024,
            hidden_size=width(768, 64),
            expand=2,
            head_dim=16 if smoke else 64,
            num_heads=2 * width(768, 64) // (16 if smoke else 64),
            state_size=16 if smoke else 128,
            n_groups=1,
            num_hidden_layers=layers,
            chunk_size=64,
        ),
        "rglru": transformers.RecurrentGemmaConfig(
            vocab_size=1024,
            hidden_size=width(2560, 64),
            lru_width=width(2560, 64),
            intermediate_size=width(7680),
            num_attention_heads=2 if smoke else 10,
            num_key_value_heads=1,
            head_dim=width(256, 16),
            num_hidden_layers=layers,
            block_types=["recurrent"],
            use_cache=False,
        ),
        "rwkv4": transformers.RwkvConfig(
            vocab_size=1024,
            hidden_size=width(1024),
            attention_hidden_size=width(1024),
            intermediate_size=width(4096),
            num_hidden_layers=layers,
            context_length=1 << 15,
        ),
    }


def timer(device: torch.device):
    def timed(fn, repeat: int = 3) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    return timed


def bandwidth(device: torch.device, timed) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = (1 << 20) if device.type == "cpu" else (1 << 28)
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / timed(lambda: b.copy_(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--families", nargs="+", default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    lengths = args.lengths or ([16, 32] if args.smoke else [512, 1024, 2048])
    timed = timer(device)
    floor_bw = bandwidth(device, timed)
    rows = []
    for family, cfg in configs(args.smoke).items():
        if args.families and family not in args.families:
            continue
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(device).eval()
        for L in lengths:
            for batch in (1, 8):
                ids = torch.randint(0, 1024, (batch, L), device=device)

                def plain(ids=ids, model=model):
                    with torch.no_grad():
                        model(ids, use_cache=False)

                def recorded(ids=ids, model=model):
                    with torch.no_grad(), ih.record(model):
                        model(ids, use_cache=False)

                row = {"family": family, "L": L, "batch": batch}
                row["forward_s"], row["recorded_s"] = timed(plain), timed(recorded)
                row["overhead"] = row["recorded_s"] / row["forward_s"]
                if batch == 1:
                    with torch.no_grad(), ih.record(model) as rec:
                        model(ids, use_cache=False)
                    view = rec[len(rec) // 2].attention
                    _ = view.factors
                    B, C, _, _ = view.shape
                    row["channels"] = C
                    row["layer_dense_s"] = timed(view.dense, 1)
                    row["dense_floor_s"] = (
                        B * C * L * L * 4 / (floor_bw / 2)
                    )  # bytes written / write bandwidth
                    row["dense_over_floor"] = row["layer_dense_s"] / row["dense_floor_s"]
                    row["all_layers_last_row_s"] = timed(lambda rec=rec: [r.attention[0, :, -1] for r in rec])
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row["layer_channel_mean_s"] = timed(view.mean, 1)
                    if device.type == "cuda":
                        row["channel_mean_peak_bytes"] = torch.cuda.max_memory_allocated()
                    row["max_output_error"] = max(r.output_error() for r in rec)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "copy_bandwidth_bytes_per_s": floor_bw,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
    }
    if not args.smoke:
        out = HERE / "results" / "gpu.json"
        out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(out)


if __name__ == "__main__":
    main()
