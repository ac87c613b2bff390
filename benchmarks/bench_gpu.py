"""The GPU figures of the performance issue in one run, for Mamba, Mamba-2, RG-LRU and RWKV-4 at the widths
of 130M-class layers (random weights):

1. recording overhead: forward time with ``record`` over without, whole models of 24 layers, batch 1 and 8,
   with a context per forward and in one context kept open (:func:`overhead_open`), and the same part by
   part (set-up, time inside our hooks, torch's hook dispatch, added device work: :func:`overhead_parts`),
   which stays measurable where launch-bound forwards swing by ±20 %;
2. dense assembly of one layer against the floor set by writing its output (bytes / measured write
   bandwidth), with the fused Triton kernel (``backend="triton"``: Mamba-1, Mamba-2, RG-LRU, RWKV-4; for
   Mamba-2 also by channel, ``kernels.TUNING["HEAD_TILES"] = False``) and the torch path;
3. the last-token row of every layer, and the channel mean ``L × L`` of one layer up to L = 16k: time and
   peak device memory above what was allocated before the read.

    python benchmarks/bench_gpu.py            # on the GPU machine: writes benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --smoke    # tiny shapes on CPU: checks that the script runs

The side-by-side with TransformerLens and the loop algorithm is ``bench_peers.py``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

import implicit_hooks as ih
from implicit_hooks import kernels
from implicit_hooks.patcher import Hooks

HERE = Path(__file__).parent


def configs(smoke: bool, layers: int) -> dict[str, transformers.PretrainedConfig]:
    """The issue's shapes (or tiny ones): batch-1 widths of the 130M-class models."""
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


def timer(device: torch.device) -> Callable[..., float]:
    """``timed(fn, repeat)``: the median of ``repeat`` synchronised runs after one warm-up run."""

    def timed(fn: Callable[[], Any], repeat: int = 3) -> float:
        fn()
        times = sorted(once(fn, device) for _ in range(repeat))
        return times[len(times) // 2]

    return timed


def once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def back_to_back(fn: Callable[[], Any], device: torch.device, reads: int = 10) -> float:
    """Seconds a read of ``fn`` costs when ``reads`` of them are issued back to back (one warm-up first,
    results dropped as they come): the host issues a read while the device runs the one before, as when
    every layer of a model is read, where :func:`once` also counts the host's issue of a lone read."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reads):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reads


def write_bandwidth(device: torch.device, timed: Callable[..., float]) -> float:
    """Bytes per second the device writes (a fill of 4 GiB; 4 MiB on CPU)."""
    n = (1 << 20) if device.type == "cpu" else (1 << 30)
    a = torch.empty(n, device=device)
    return n * 4 / timed(lambda: a.fill_(1.0), 5)


def peak(fn: Callable[[], Any], device: torch.device) -> tuple[float, int | None]:
    """Seconds ``fn()`` takes and the device memory it allocates at its peak above what was allocated
    before (the clean-up before it, ``gc.collect()`` and ``empty_cache()``, is not timed)."""
    if device.type != "cuda":
        return once(fn, device), None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = once(fn, device)
    return seconds, torch.cuda.max_memory_allocated() - base


def build(cfg: transformers.PretrainedConfig, layers: int, device: torch.device) -> torch.nn.Module:
    cfg = cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": layers})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device).eval()


def record(model: torch.nn.Module, ids: torch.Tensor, layers: list[int] | None = None) -> ih.Recording:
    with torch.no_grad(), ih.record(model, layers=layers) as rec:
        model(ids, use_cache=False)
    return rec


def one_layer_views(
    families: list[str], lengths: list[int], device: torch.device, smoke: bool, backend: str = "auto"
) -> Iterator[tuple[str, int, ih.AttentionView]]:
    """``(family, L, view)``: the first layer's view of each family's model (:func:`configs`, two layers) at
    each length, after one dense read (kernels compiled, factors kept); the device's cache emptied after."""
    for family, cfg in configs(smoke, 2).items():
        if family not in families:
            continue
        model = build(cfg, 2, device)
        for L in lengths:
            ids = torch.randint(0, 1024, (1, L), device=device)
            view = record(model, ids, layers=[0])[0].attention.with_backend(backend)
            view.dense()
            yield family, L, view
            del view
            if device.type == "cuda":
                torch.cuda.empty_cache()


def issue_seconds(fn: Callable[[], Any], device: torch.device, reads: int) -> float:
    """Median seconds from the call of ``fn`` until it returns (not until the device is done), the device
    idle at each call: what the host spends issuing it."""
    times = []
    for _ in range(reads):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reads // 2]


def hook_cost(device: torch.device, calls: int = 2000) -> float:
    """Seconds torch's module call adds when a module has a forward pre-hook and a forward hook (both
    no-ops): what every hooked module call pays before our hooks run (the smallest of 5 timings)."""
    layer = torch.nn.Linear(4, 4, device=device)
    x = torch.zeros(1, 4, device=device)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(calls):
                layer(x)
        return time.perf_counter() - start

    plain = min(run() for _ in range(5))
    handles = [
        layer.register_forward_pre_hook(lambda m, a: None),
        layer.register_forward_hook(lambda m, a, o: None),
    ]
    try:
        hooked = min(run() for _ in range(5))
    finally:
        for h in handles:
            h.remove()
    return max(0.0, hooked - plain) / calls


def device_busy(fn: Callable[[], Any], device: torch.device) -> tuple[float, int]:
    """Seconds of device kernels ``fn`` runs and how many kernels (torch.profiler; CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels_ = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels_) * 1e-6, len(kernels_)


def overhead_parts(model, ids, device, forward_s: float, per_call: float) -> dict:
    """What recording adds to one forward, measured part by part (each is stable where the forward's own
    time swings by ±20 %): entering and leaving ``record`` (``setup_s``, in a loop; ``setup_cold_s``, the
    median of 5 right after a forward, as a context per forward pays it: about twice as long, run ZZ, its
    code and the module tree out of the host's caches), the host time inside our hooks
    (``hooks_s``, timed by wrapping each hook as :class:`implicit_hooks.patcher.Hooks` adds it), torch's
    extra work per hooked module call (``dispatch_s`` = calls × :func:`hook_cost`), and the device time of
    kernels the recording adds
    (``extra_device_s``, by the profiler; copies of taps the model overwrites in place). Their sum over the
    forward (with the cold set-up) bounds the overhead from above, as host and device work overlap."""
    spent = [0.0, 0]
    registers = {
        name: getattr(torch.nn.Module, name)
        for name in ("register_forward_hook", "register_forward_pre_hook")
    }

    def timed_hook(hook):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return hook(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start
                spent[1] += 1

        return wrapper

    def patched(name):
        return lambda module, hook, *a, **k: registers[name](module, timed_hook(hook), *a, **k)

    add = Hooks.add  # how patchers attach their hooks (older code: torch's register_*, patched too)

    def timed_add(hooks, module, hook, **options):
        return add(hooks, module, timed_hook(hook), **options)

    def recorded():
        with torch.no_grad(), ih.record(model):
            model(ids, use_cache=False)

    def plain():
        with torch.no_grad():
            model(ids, use_cache=False)

    setup = []
    for _ in range(5):
        start = time.perf_counter()
        with ih.record(model):
            pass
        setup.append(time.perf_counter() - start)
    cold = []
    for _ in range(5):
        once(plain, device)  # a forward, then the device waited for
        start = time.perf_counter()
        with ih.record(model):
            pass
        cold.append(time.perf_counter() - start)
    for name in registers:
        setattr(torch.nn.Module, name, patched(name))
    Hooks.add = timed_add
    try:
        recorded()
    finally:
        Hooks.add = add
        for name, fn in registers.items():
            setattr(torch.nn.Module, name, fn)
    modules = {id(m) for m in model.modules() if m._forward_hooks or m._forward_pre_hooks}
    parts = {"setup_s": min(setup), "setup_cold_s": sorted(cold)[len(cold) // 2], "hooks_s": spent[0],
             "hook_calls": spent[1]}  # fmt: skip
    parts["dispatch_s"] = spent[1] * per_call  # at most one hooked module call per hook call
    if device.type == "cuda":
        busy_plain, n_plain = device_busy(plain, device)
        busy_rec, n_rec = device_busy(recorded, device)
        parts["extra_device_s"], parts["extra_kernels"] = busy_rec - busy_plain, n_rec - n_plain
    parts["left_hooked_modules"] = len(modules)  # after record exited: must be 0
    added = parts["setup_cold_s"] + parts["hooks_s"] + parts["dispatch_s"]
    added += max(0.0, parts.get("extra_device_s", 0))
    parts["overhead_bound"] = 1 + added / forward_s
    return parts


def quartiles(ratios: list[float]) -> list[float]:
    """The first quartile, the median and the third quartile of ``ratios``."""
    ratios = sorted(ratios)
    return [ratios[len(ratios) * k // 4] for k in (1, 2, 3)]


def overhead_open(model, ids, device, pairs: int) -> dict:
    """Recording in a context kept open over many forwards: what every forward pays once the hooks are
    attached, ``rec.clear()`` after it included, without entering and leaving ``record``. A copy of the
    model with the same weights runs the plain forwards, alternating with the recorded ones; ``twin_paired``
    is the same pairs with neither recorded, the copy's own difference (≈ 1)."""
    twin = copy.deepcopy(model)

    def forward(m):
        return lambda: m(ids, use_cache=False)

    with torch.no_grad():
        forward(model)(), forward(twin)()
        twin_paired = [once(forward(model), device) / once(forward(twin), device) for _ in range(pairs)]
        with ih.record(model) as rec:
            forward(model)()
            rec.clear()
            paired = []
            for _ in range(pairs):
                plain = once(forward(twin), device)
                paired.append(once(lambda: (forward(model)(), rec.clear()), device) / plain)
    del twin
    return {"overhead_open_paired": quartiles(paired), "twin_paired": quartiles(twin_paired)}


def overhead(family, cfg, args, device, timed) -> list[dict]:
    """Forward with and without ``record``, whole 24-layer models: alternating runs (``--overhead-pairs``, 7
    by default, so that drifts hit both alike), ``overhead`` the ratio of the fastest runs (launch-bound
    forwards, such as HF's slow Mamba path, swing by ±20 % from run to run), ``overhead_median`` that of
    the medians, ``overhead_paired`` the median and quartiles of each pair's ratio (a recorded forward over
    the plain one just before it: with many pairs, a figure the forward's own drift moves least), and
    ``overhead_open_paired`` the same inside one open context (:func:`overhead_open`)."""
    model = build(cfg, args.layers, device)
    per_call = hook_cost(device)
    rows = []
    for L in args.overhead_lengths:
        for batch in args.overhead_batches:
            ids = torch.randint(0, 1024, (batch, L), device=device)

            def plain(ids=ids):
                with torch.no_grad():
                    model(ids, use_cache=False)

            def recorded(ids=ids):
                with torch.no_grad(), ih.record(model):
                    model(ids, use_cache=False)

            plain_s, recorded_s = [], []
            plain(), recorded()  # warm-up
            for _ in range(2 if args.smoke else args.overhead_pairs):
                plain_s.append(once(plain, device))
                recorded_s.append(once(recorded, device))
            row = {"family": family, "part": "overhead", "L": L, "batch": batch, "layers": args.layers}
            row["forward_s"], row["recorded_s"] = min(plain_s), min(recorded_s)
            row["overhead"] = row["recorded_s"] / row["forward_s"]
            median = sorted(recorded_s)[len(recorded_s) // 2] / sorted(plain_s)[len(plain_s) // 2]
            row["overhead_median"] = median
            row["overhead_paired"] = quartiles([r / p for r, p in zip(recorded_s, plain_s)])
            row["pairs"] = len(recorded_s)
            row.update(overhead_open(model, ids, device, len(recorded_s)))
            row.update(overhead_parts(model, ids, device, row["forward_s"], per_call))
            if batch == 1:  # rows of fresh records (every layer's factors derived), then of the same again

                def last_rows(rec):
                    return lambda: [r.attention[0, :, -1] for r in rec]

                last_rows(record(model, ids))()  # kernels compiled
                fresh = sorted(once(last_rows(record(model, ids)), device) for _ in range(3))
                rec = record(model, ids)
                row["all_layers_last_row_s"] = fresh[1]
                row["all_layers_last_row_cached_s"] = timed(last_rows(rec))
                row["max_output_error"] = max(r.output_error() for r in rec)
                del rec
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def assembly(family, cfg, args, device, timed, bandwidth) -> list[dict]:
    """Dense and channel-mean reads of one layer (the first of a two-layer model of the same width)."""
    model = build(cfg, 2, device)  # HF's RWKV initialisation divides by (layers − 1)
    fused = kernels.available(device) and family in ("mamba", "mamba2", "rglru", "rwkv4")
    backends = ["torch"] + (["triton"] if fused else [])
    rows = []
    for L in sorted(set(args.dense_lengths) | set(args.mean_lengths)):
        ids = torch.randint(0, 1024, (1, L), device=device)
        rec = record(model, ids, layers=[0])
        view = rec[0].attention
        _ = view.factors
        B, C = view.shape[:2]
        row = {"family": family, "part": "assembly", "L": L, "channels": C}
        row["output_error"] = rec[0].output_error()
        if L in args.dense_lengths:
            row["dense_floor_s"] = B * C * L * L * 4 / bandwidth
            for backend in backends:
                if backend == "torch" and L > args.torch_dense_max:
                    continue
                v = view.with_backend(backend)
                seconds = timed(lambda v=v: v.dense(), 1 if backend == "torch" else 3)
                row[f"dense_{backend}_s"] = seconds
                row[f"dense_{backend}_over_floor"] = seconds / row["dense_floor_s"]
                if backend == "triton":  # reads issued back to back: the device's rate
                    seconds = back_to_back(lambda v=v: v.dense(), device)
                    row["dense_triton_back_to_back_s"] = seconds
                    row["dense_triton_back_to_back_over_floor"] = seconds / row["dense_floor_s"]
                torch.cuda.empty_cache() if device.type == "cuda" else None
            if "triton" in backends:  # stored in bfloat16: half the bytes, against its own floor
                v = view.with_backend("triton")
                seconds = timed(lambda v=v: v.dense(torch.bfloat16), 3)
                row["dense_bf16_floor_s"] = row["dense_floor_s"] / 2
                row["dense_triton_bf16_s"] = seconds
                row["dense_triton_bf16_over_floor"] = seconds / row["dense_bf16_floor_s"]
                seconds = back_to_back(lambda v=v: v.dense(torch.bfloat16), device)
                row["dense_triton_bf16_back_to_back_s"] = seconds
                row["dense_triton_bf16_back_to_back_over_floor"] = seconds / row["dense_bf16_floor_s"]
                torch.cuda.empty_cache()
            if family == "mamba2" and "triton" in backends:  # the default is by head: also by channel
                kernels.TUNING["HEAD_TILES"] = False
                try:
                    v = view.with_backend("triton")
                    seconds = timed(lambda v=v: v.dense(), 3)
                finally:
                    kernels.TUNING["HEAD_TILES"] = True
                row["dense_triton_by_channel_s"] = seconds
                row["dense_triton_by_channel_over_floor"] = seconds / row["dense_floor_s"]
            if "triton" in backends and L <= args.torch_dense_max:
                a, b = view.with_backend("triton").dense(), view.with_backend("torch").dense()
                row["triton_vs_torch_rel"] = float((a - b).norm() / b.norm())
                del a, b
        if L in args.mean_lengths:
            for backend in backends:
                v = view.with_backend(backend)
                # past --torch-mean-max the torch path reads a slice of channels: the peak is that of the
                # whole mean (tiles are bounded), the time scales with the channels (marked extrapolated)
                part = slice(None) if backend != "torch" or L <= args.torch_mean_max else slice(0, args.slice)
                n = len(range(*part.indices(C)))
                if n == 0:  # --slice 0: no torch path past --torch-mean-max
                    continue
                if backend != "torch" or L <= 4096:  # the first call compiles kernels: time the second
                    v.mean(channels=part)  # (the torch path past 4k: minutes, and it compiles nothing)
                seconds, peak_bytes = peak(lambda v=v, part=part: v.mean(channels=part), device)
                row[f"mean_{backend}_s"] = seconds * C / n
                row[f"mean_{backend}_peak_bytes"] = peak_bytes
                if n < C:
                    row[f"mean_{backend}_extrapolated_from_channels"] = n
        rows.append(row)
        print(json.dumps(row), flush=True)
        del rec, view
    return rows


def last_rows(family, cfg, args, device, timed) -> list[dict]:
    """The last token's row of every channel of one layer (``view[0, :, -1]``), by each backend: time and
    peak memory above what was allocated before (``backend="auto"`` takes the torch path for reads of
    fewer than ``FUSED_MIN_ROWS`` rows)."""
    model = build(cfg, 2, device)
    fused = kernels.available(device) and family in ("mamba", "mamba2", "rglru", "rwkv4")
    out = []
    for L in args.row_lengths:
        ids = torch.randint(0, 1024, (1, L), device=device)
        view = record(model, ids, layers=[0])[0].attention
        _ = view.factors
        row = {"family": family, "part": "row", "L": L, "channels": view.shape[1]}
        reference = view.with_backend("torch")[0, :, -1]
        for backend in ["torch"] + (["triton"] if fused else []):
            v = view.with_backend(backend)
            v[0, :, -1]  # compiled, allocated
            row[f"row_{backend}_s"] = timed(lambda v=v: v[0, :, -1], 5)
            row[f"row_{backend}_peak_bytes"] = peak(lambda v=v: v[0, :, -1], device)[1]
            got = v[0, :, -1]
            row[f"row_{backend}_vs_torch_rel"] = float((got - reference).norm() / reference.norm())
        out.append(row)
        print(json.dumps(row), flush=True)
        del view
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--parts", nargs="+", default=["overhead", "assembly", "rows"])
    parser.add_argument("--layers", type=int, default=None, help="model depth for the overhead (24)")
    parser.add_argument("--overhead-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--overhead-pairs", type=int, default=7, help="alternating forwards with and without")
    parser.add_argument("--overhead-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dense-lengths", type=int, nargs="*", default=None, help="none: no such read")
    parser.add_argument("--mean-lengths", type=int, nargs="*", default=None, help="none: no such read")
    parser.add_argument("--row-lengths", type=int, nargs="*", default=None, help="none: no such read")
    parser.add_argument("--torch-dense-max", type=int, default=1024, help="longest torch-path dense")
    parser.add_argument("--torch-mean-max", type=int, default=1024, help="longest full torch-path mean")
    parser.add_argument("--slice", type=int, default=64, help="channels of longer torch-path means")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.layers = args.layers or (2 if args.smoke else 24)
    args.overhead_lengths = args.overhead_lengths or ([16] if args.smoke else [512, 1024])
    defaults = {  # (smoke, full)
        "dense_lengths": ([16, 80], [512, 1024, 2048]),
        "mean_lengths": ([80, 200], [1024, 4096, 16384]),
        "row_lengths": ([16, 80], [512, 2048, 16384]),
    }
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:  # an empty list stays empty: no such read
            setattr(args, name, smoke if args.smoke else full)
    timed = timer(device)
    bandwidth = write_bandwidth(device, timed)
    torch.backends.cuda.matmul.allow_tf32 = False  # every figure in true float32
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "write_bandwidth_bytes_per_s": bandwidth,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(kernels.triton, "__version__", None),
        "python": platform.python_version(),
        "smoke": args.smoke,
    }
    out = Path(args.out)
    rows = []
    for family, cfg in configs(args.smoke, args.layers).items():
        if args.families and family not in args.families:
            continue
        if "overhead" in args.parts:
            rows += overhead(family, cfg, args, device, timed)
        if "assembly" in args.parts:
            rows += assembly(family, cfg, args, device, timed, bandwidth)
        if "rows" in args.parts:
            rows += last_rows(family, cfg, args, device, timed)
        if not args.smoke:  # after every family: a run cut short by a time limit keeps what it measured
            out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    if not args.smoke:
        print(out)


if __name__ == "__main__":
    main()
