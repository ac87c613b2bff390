"""GPU timings of recording and of view reads for one Mamba-1 model at 130M-class shapes.

    python benchmarks/bench_mamba_gpu.py      # writes benchmarks/results/mamba_gpu.json

24 layers, d_model 768, 1536 inner channels, N = 16, batch 1, random weights. Issue #8 extends this
(all families, more lengths, the bandwidth floor, peers); this is the foundation's first measurement.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers
from transformers import MambaConfig, MambaModel

import implicit_hooks as ih

HERE = Path(__file__).parent


def cuda_time(fn, repeat: int = 5) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up, timed with CUDA events."""
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


def main() -> None:
    torch.manual_seed(0)
    cfg = MambaConfig(
        vocab_size=1024, hidden_size=768, state_size=16, num_hidden_layers=24, intermediate_size=1536
    )
    model = MambaModel(cfg).cuda().eval()
    rows = []
    for L in (512, 1024):  # HF's torch scan loops over L in Python: longer forwards take minutes
        ids = torch.randint(0, 1024, (1, L), device="cuda")

        def recorded(ids=ids):
            with ih.record(model):
                model(ids)

        with torch.no_grad():
            plain_s = cuda_time(lambda ids=ids: model(ids))
            record_s = cuda_time(recorded)
            with ih.record(model) as rec:
                model(ids)
        view = rec[12].attention
        _ = view.factors
        row = {
            "L": L,
            "forward_s": plain_s,
            "forward_recorded_s": record_s,
            "overhead": record_s / plain_s,
            "layer_dense_s": cuda_time(view.dense, 3),  # C·L² floats: 6.4 GB at L = 1024
            "layer_last_row_s": cuda_time(lambda view=view: view[0, :, -1]),
            "all_layers_last_row_s": cuda_time(lambda rec=rec: [r.attention[0, :, -1] for r in rec], 3),
            "layer_channel_mean_s": cuda_time(view.mean, 3),
            "max_output_error": max(r.output_error() for r in rec),
        }
        torch.cuda.reset_peak_memory_stats()
        view.mean()
        row["channel_mean_peak_bytes"] = torch.cuda.max_memory_allocated()
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "layers": 24,
        "d_model": 768,
        "channels": 1536,
        "state": 16,
    }
    out = HERE / "results" / "mamba_gpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
