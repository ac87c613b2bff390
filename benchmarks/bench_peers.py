"""Side by side, same process, same inputs: implicit_hooks against TransformerLens'
``compute_ssm_effective_attention`` and against the nested-loop algorithm class of the paper's released
code, for one Mamba-1 layer at 130M-class widths (1536 channels, N = 16), batch 1, random weights.

    python benchmarks/bench_peers.py              # CUDA if present: writes benchmarks/results/peers.json
    python benchmarks/bench_peers.py --smoke      # tiny shapes on CPU, nothing written (< 1 min)

What is timed (median of 3 after a warm-up, CUDA-synchronised) and measured (peak bytes allocated
above what was allocated before the call, CUDA only), for the last layer of a ``MambaForCausalLM``:

- ours: ``rec[i].attention.dense()`` (the full ``G·(R+D)·Z·M`` matrix) and
  ``rec[i].attention.only("ssm").dense()`` (the S6 matrix ``R``, what the peers compute); the one-off
  derivation of the view's factors is timed on its own (``setup``);
- TransformerLens: ``cache.compute_ssm_effective_attention(layer=i)`` on a ``TransformerBridge``
  wrapped around a copy of the same model, after ``run_with_cache`` on the same ids. Its default is
  ``R`` with column ``j`` divided by ``Δ_j``; ``include_dt_scaling=True`` returns ``R`` itself (both
  timed; the numerical check below says how they relate to ours);
- the loop: ``loop_matrix`` of ``bench_mamba_cpu.py`` (one decay product per ``(t, j)`` pair, an inner
  loop over ``k``) on the recorded ``delta``/``A``/``B``/``C``, run on the same device at small lengths
  and extrapolated to the benchmark lengths (marked as such).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import platform
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_gpu import timer
from bench_mamba_cpu import loop_matrix
from transformers import MambaConfig, MambaForCausalLM

import implicit_hooks as ih

HERE = Path(__file__).parent
GIB = 1 << 30


def shim_datasets() -> None:
    """Stand-ins for the ``datasets`` names that ``import transformer_lens`` binds at import time.

    TransformerLens imports ``datasets`` at the top of ``utilities/hf_utils.py`` and
    ``utilities/tokenize_utils.py`` (for its dataset-loading helpers), but nothing on the path this
    benchmark takes (bridge, ``run_with_cache``, ``compute_ssm_effective_attention``) uses it. The GPU
    machine has no ``datasets`` (and the real one ties itself to a pyarrow version), so when it is absent
    these empty modules take its place; any use of them raises. Installed only if ``datasets`` is missing.
    """
    if importlib.util.find_spec("datasets") is not None:
        return

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("datasets is not installed (bench_peers.py shims it for TransformerLens' import)")

    names = ("datasets", "datasets.arrow_dataset", "datasets.iterable_dataset", "datasets.load")
    mods = {name: types.ModuleType(name) for name in names}
    mods["datasets"].__path__ = []  # a package, so that its sub-modules resolve
    mods["datasets.arrow_dataset"].Dataset = type("Dataset", (), {})
    mods["datasets.iterable_dataset"].IterableDataset = type("IterableDataset", (), {})
    mods["datasets.load"].load_dataset = unavailable
    mods["datasets"].load_dataset = unavailable
    sys.modules.update(mods)


def tl_bridge(model: MambaForCausalLM) -> Any:
    """A TransformerLens ``TransformerBridge`` around a copy of ``model`` (same weights), no hub access.

    ``build_bridge_from_module`` is TransformerLens' entry for a pre-loaded module; it replaces
    sub-modules of the model it is given in place, hence the copy (our hooks stay on the original).
    """
    shim_datasets()
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    twin = copy.deepcopy(model)
    return build_bridge_from_module(twin, type(twin).__name__, hf_config=twin.config)


def tl_cache(bridge: Any, ids: torch.Tensor, layer: int) -> tuple[Any, Any, str]:
    """``run_with_cache`` on the bridge: ``(logits, cache, path)``.

    TransformerLens reads ``dt`` from ``dt_proj``'s output hook. transformers' ``MambaMixer`` (5.1x and
    later) multiplies by ``dt_proj.weight`` instead of calling the module, so that hook does not fire on
    the default path; TransformerLens' opt-in eager scan (``mixer.eager_scan = True``) calls the module.
    The default path is tried first; ``path`` says which one filled the cache. ``use_cache=False``:
    the eager scan runs only when the mixer gets no cache (transformers 5.17 passes one otherwise).
    """
    key = f"blocks.{layer}.mixer.dt_proj.hook_out"
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids, use_cache=False)
        if key not in cache:
            del cache
            for block in bridge.blocks:
                block.mixer.eager_scan = True
            logits, cache = bridge.run_with_cache(ids, use_cache=False)
    if key not in cache:
        raise RuntimeError(f"TransformerLens' cache has no {key!r} even with eager_scan")
    synchronize(ids.device)
    return logits, cache, "eager_scan" if bridge.blocks[layer].mixer.eager_scan else "default"


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated while ``fn`` runs (its result included) above what was allocated before."""
    if device.type != "cuda":
        return None
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def s6_tensors(record: ih.BlockRecord, length: int) -> dict[str, torch.Tensor]:
    """The recorded ``delta``/``A``/``B``/``C`` of the first ``length`` positions (a causal prefix)."""
    t = record.tensors
    return {
        "delta": t["delta"][:, :, :length],
        "A": t["A"],
        "B": t["B"][:, :length],
        "C": t["C"][:, :length],
    }


def loop_work(L: int) -> tuple[float, float]:
    """Work counts of ``loop_matrix`` at length ``L``: inner decay products and ``(t, j)`` pairs."""
    return (L**3 - L) / 6, L * (L + 1) / 2


def loop_model(measured: dict[int, float]) -> Callable[[int], float]:
    """Seconds of ``loop_matrix`` at any ``L``: ``α·products(L) + β·pairs(L)``, least squares on the
    measured lengths (proportional to the products alone from the longest one if that fit is not
    non-negative or there is a single length)."""
    Ls = sorted(measured)
    longest = Ls[-1]
    alpha, beta = measured[longest] / loop_work(longest)[0], 0.0
    if len(Ls) > 1:
        X = torch.tensor([loop_work(L) for L in Ls], dtype=torch.float64)
        y = torch.tensor([measured[L] for L in Ls], dtype=torch.float64)[:, None]
        a, b = torch.linalg.lstsq(X, y).solution.flatten().tolist()
        if a > 0 and b >= 0:
            alpha, beta = a, b

    def seconds(L: int) -> float:
        products, pairs = loop_work(L)
        return alpha * products + beta * pairs

    return seconds


def oom_request(message: str) -> int:
    """Bytes of the allocation a CUDA out-of-memory error says it tried (0 if it does not say)."""
    match = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB)", message)
    if not match:
        return 0
    return int(float(match[1]) * {"GiB": GIB, "MiB": 1 << 20, "KiB": 1 << 10}[match[2]])


def run_tl(
    cache: Any, layer: int, dt: bool, device: torch.device, timed: Callable, cpu_limit: float, shape: tuple
) -> dict[str, Any]:
    """Time and peak of TransformerLens' effective attention, or why it did not finish."""
    B, C, N, L = shape
    tensor_5d = B * C * N * L * L * 4  # its (batch, channels, state, L, L) float32 decay tensor
    call = lambda: cache.compute_ssm_effective_attention(layer=layer, include_dt_scaling=dt)  # noqa: E731
    if device.type == "cpu" and 4 * tensor_5d > cpu_limit:
        return {"skipped": f"needs ≥ {4 * tensor_5d / GIB:.1f} GiB (4 tensors of shape B·C·N·L·L)"}
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any]
    try:
        with torch.no_grad():
            out = {"s": timed(call), "peak_bytes": peak_bytes(call, device)}
    except torch.cuda.OutOfMemoryError as error:  # the frames holding its tensors go with `error`
        out = {
            "oom": True,
            "peak_bytes_at_least": torch.cuda.max_memory_allocated() - before + oom_request(str(error)),
            "error": str(error).splitlines()[0][:200],
        }
    release(device)
    return out


def fmt_s(s: float | None, star: bool = False) -> str:
    if s is None:
        return "–"
    text = f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 1e3 else f"{s:.3g} s"
    return text + ("*" if star else "")


def fmt_b(b: int | None) -> str:
    return "–" if b is None else f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / (1 << 20):.1f} MiB"


def fmt_x(x: float | None, at_least: bool = False) -> str:
    return "–" if x is None else ("≥ " if at_least else "") + (f"{x:.3g}×" if x < 1e4 else f"{x:.2e}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, writes nothing")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 512 1024")
    parser.add_argument("--layers", type=int, default=None, help="model depth (default 2); the last is timed")
    parser.add_argument("--loop-lengths", type=int, nargs="+", default=None, help="default 16 32 64 128")
    parser.add_argument("--loop-budget", type=float, default=60.0, help="seconds per loop measurement")
    parser.add_argument("--check-length", type=int, default=None, help="L of the TL-vs-ours check (64)")
    parser.add_argument("--cpu-limit-gib", type=float, default=8.0, help="skip TL on CPU above this")
    args = parser.parse_args()
    if importlib.util.find_spec("transformer_lens") is None:  # before minutes of loop baselines, not after
        parser.exit(2, "bench_peers.py times TransformerLens against us: pip install transformer-lens\n")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    lengths = args.lengths or ([32, 64] if args.smoke else [512, 1024])
    loop_lengths = sorted(args.loop_lengths or ([4, 8, 16] if args.smoke else [16, 32, 64, 128]))
    check_length = args.check_length or (16 if args.smoke else 64)
    n_layers = args.layers or 2
    layer = n_layers - 1
    timed = timer(device)

    torch.manual_seed(0)
    cfg = MambaConfig(
        vocab_size=1024,
        hidden_size=64 if args.smoke else 768,
        intermediate_size=128 if args.smoke else 1536,
        state_size=16,
        num_hidden_layers=n_layers,
    )
    model = MambaForCausalLM(cfg).to(device).eval()
    C, N = cfg.intermediate_size, cfg.state_size
    start = time.perf_counter()
    bridge = tl_bridge(model)
    bridge_s = time.perf_counter() - start

    def record(ids: torch.Tensor) -> tuple[torch.Tensor, ih.BlockRecord]:
        with torch.no_grad(), ih.record(model) as rec:
            logits = model(ids, use_cache=False).logits
        synchronize(device)
        return logits, rec[layer]

    # --- the numerical check and the loop, at small L (one recording; shorter L are its prefixes) -----
    small = max(check_length, loop_lengths[-1])
    ids = torch.randint(0, cfg.vocab_size, (1, small), device=device)
    logits, rec = record(ids)
    view = rec.attention
    assert "ssm" in view.components, view.components
    ours = view.only("ssm")[0, :, :check_length, :check_length]  # (C, L, L)
    delta = rec.tensors["delta"][0, :, :check_length]  # (C, L)
    tl_logits, cache, tl_path = tl_cache(bridge, ids[:, :check_length], layer)
    with torch.no_grad():
        tl_plain = cache.compute_ssm_effective_attention(layer=layer)[0]
        tl_dt = cache.compute_ssm_effective_attention(layer=layer, include_dt_scaling=True)[0]
    check = {
        "L": check_length,
        "components": list(view.components),
        "tl_shape": list(tl_plain.shape),
        "tl_forward_vs_hf_logits_max_abs_diff": float((tl_logits - logits[:, :check_length]).abs().max()),
        "tl_dt_scaled_vs_ours_s6_rel": relative_diff(tl_dt, ours),
        "tl_default_times_delta_j_vs_ours_s6_rel": relative_diff(tl_plain * delta[:, None, :], ours),
        "tl_default_vs_ours_s6_rel": relative_diff(tl_plain, ours),
        "ours_full_vs_ours_s6_rel": relative_diff(view[0, :, :check_length, :check_length], ours),
        "reading": "TL(include_dt_scaling=True) is our S6-only matrix R = only('ssm'); TL's default is R "
        "with column j divided by Δ_j (the attention-like form). Our full matrix adds the gate "
        "SiLU(z_t) on rows, D on the diagonal, and SiLU'·conv on columns, which TL leaves out.",
    }
    print(json.dumps({"check": check}), flush=True)
    del cache, tl_plain, tl_dt, tl_logits

    loop_measured: dict[int, float] = {}
    loop_rows = []
    with torch.device(device):  # loop_matrix allocates its output on the default device
        loop_matrix(s6_tensors(rec, 2), [0, 1])  # warm-up
        for L in loop_lengths:
            predicted = loop_model(loop_measured)(L) if loop_measured else 0.0
            if predicted > args.loop_budget:
                loop_rows.append({"L": L, "skipped_predicted_s": predicted})
                continue
            d = s6_tensors(rec, L)
            synchronize(device)
            start = time.perf_counter()
            reference = loop_matrix(d, list(range(L)))
            synchronize(device)
            loop_measured[L] = time.perf_counter() - start
            diff = relative_diff(reference, view.only("ssm")[0, :, :L, :L])
            loop_rows.append({"L": L, "s": loop_measured[L], "vs_ours_s6_rel": diff})
            print(json.dumps({"loop": loop_rows[-1]}), flush=True)
    loop_seconds = loop_model(loop_measured)
    del rec, view, ours, logits
    release(device)

    # --- the benchmark lengths -------------------------------------------------------------------------
    rows = []
    for L in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, L), device=device)
        row: dict[str, Any] = {"L": L, "channels": C, "state": N, "layer": layer}
        start = time.perf_counter()
        _, rec = record(ids)
        row["ours_record_forward_s"] = time.perf_counter() - start

        def setup(rec: ih.BlockRecord = rec) -> ih.Factors:
            rec.cache.clear()  # the patcher's derived tensors: rebuilt from the recorded ones
            return rec.factors(torch.float32)

        row["ours_setup_s"] = timed(setup)
        rec.cache.clear()
        row["ours_setup_peak_bytes"] = peak_bytes(lambda rec=rec: rec.factors(torch.float32), device)
        view = rec.attention
        _ = view.factors  # built once, outside the timed reads
        s6 = view.only("ssm")
        with torch.no_grad():
            row["ours_full_s"] = timed(view.dense)
            row["ours_full_peak_bytes"] = peak_bytes(view.dense, device)
            row["ours_s6_s"] = timed(s6.dense)
            row["ours_s6_peak_bytes"] = peak_bytes(s6.dense, device)
        release(device)

        start = time.perf_counter()
        _, cache, _ = tl_cache(bridge, ids, layer)
        row["tl_run_with_cache_s"] = time.perf_counter() - start
        limit = args.cpu_limit_gib * GIB
        for key, dt in (("tl", False), ("tl_dt", True)):
            result = run_tl(cache, layer, dt, device, timed, limit, (1, C, N, L))
            row.update({f"{key}_{k}": v for k, v in result.items()})
        if "tl_s" in row:  # agreement at this length (TL's cumulative-sum differences are float32)
            with torch.no_grad():
                tl = cache.compute_ssm_effective_attention(layer=layer)
                tl.mul_(rec.tensors["delta"][:, :, None, :])
                row["tl_times_delta_vs_ours_s6_rel"] = relative_diff(tl, s6.dense())
            del tl
        del cache
        release(device)

        row["loop_s"] = loop_measured.get(L) or loop_seconds(L)
        row["loop_extrapolated"] = L not in loop_measured
        for ours in ("ours_s6", "ours_full"):
            if "tl_s" in row:
                row[f"tl_over_{ours}_time"] = row["tl_s"] / row[f"{ours}_s"]
                row[f"tl_dt_over_{ours}_time"] = row["tl_dt_s"] / row[f"{ours}_s"]
            tl_peak = row.get("tl_peak_bytes") or row.get("tl_peak_bytes_at_least")
            if tl_peak and row[f"{ours}_peak_bytes"]:
                row[f"tl_over_{ours}_peak"] = tl_peak / row[f"{ours}_peak_bytes"]
            row[f"loop_over_{ours}_time"] = row["loop_s"] / row[f"{ours}_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del rec, view, s6
        release(device)

    goals = {}
    for r in rows:
        if r["L"] == 512:
            goals["loop_ge_1e4_at_512"] = r["loop_over_ours_s6_time"] >= 1e4
        if r["L"] in (512, 1024):  # TL out of memory: its time does not exist, its peak is a bound
            faster = r.get("tl_over_ours_s6_time")
            oom = "TL out of memory" if r.get("tl_oom") else None
            goals[f"tl_faster_ge_3_at_{r['L']}"] = oom if faster is None else faster >= 3
            less = r.get("tl_over_ours_s6_peak")
            goals[f"tl_peak_ge_10_at_{r['L']}"] = None if less is None else less >= 10
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "python": platform.python_version(),
        "model": f"MambaForCausalLM, {n_layers} layers, d_model {cfg.hidden_size}, {C} channels, N = {N}",
        "batch": 1,
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory
        if device.type == "cuda"
        else None,
        "tl_cache_path": tl_path,
        "tl_bridge_build_s": bridge_s,
        "smoke": args.smoke,
        "note": "peaks are bytes allocated above those allocated before the call, its result included "
        "(CUDA only); loop_s past the measured lengths is extrapolated with "
        "α·(L³−L)/6 + β·L(L+1)/2 fitted on them",
    }
    lines = [
        "| L | ours full dense | ours S6 dense | ours setup | TL | TL ×Δ | loop (S6) "
        "| TL ÷ ours S6: time, peak | TL ÷ ours full: time, peak | loop ÷ ours S6 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        at_least = "tl_peak_bytes_at_least" in r
        if "tl_s" in r:
            tl, tl_dt = (f"{fmt_s(r[k + '_s'])} ({fmt_b(r[k + '_peak_bytes'])})" for k in ("tl", "tl_dt"))
        else:
            tl = tl_dt = (
                f"OOM (≥ {fmt_b(r['tl_peak_bytes_at_least'])})" if at_least else r.get("tl_skipped", "–")
            )
        lines.append(
            f"| {r['L']} | {fmt_s(r['ours_full_s'])} ({fmt_b(r['ours_full_peak_bytes'])}) "
            f"| {fmt_s(r['ours_s6_s'])} ({fmt_b(r['ours_s6_peak_bytes'])}) | {fmt_s(r['ours_setup_s'])} "
            f"| {tl} | {tl_dt} | {fmt_s(r['loop_s'], r['loop_extrapolated'])} "
            f"| {fmt_x(r.get('tl_over_ours_s6_time'))}, {fmt_x(r.get('tl_over_ours_s6_peak'), at_least)} "
            f"| {fmt_x(r.get('tl_over_ours_full_time'))}, {fmt_x(r.get('tl_over_ours_full_peak'), at_least)} "
            f"| {fmt_x(r['loop_over_ours_s6_time'])} |"
        )
    lines += [
        "",
        "`*` extrapolated from the loop's measured lengths "
        + ", ".join(f"{r['L']}: {fmt_s(r['s'])}" for r in loop_rows if "s" in r)
        + ". TL = `compute_ssm_effective_attention(layer)` (R with column j ÷ Δ_j); TL ×Δ = with "
        "`include_dt_scaling=True` (= our S6 matrix).",
        f"Check at L = {check['L']}: max|TL(×Δ) − ours S6| / max|ours S6| = "
        f"{check['tl_dt_scaled_vs_ours_s6_rel']:.2e}; TL default · Δ_j: "
        f"{check['tl_default_times_delta_j_vs_ours_s6_rel']:.2e}; TL default as is: "
        f"{check['tl_default_vs_ours_s6_rel']:.2e}; loop vs ours: "
        + ", ".join(f"{r['vs_ours_s6_rel']:.1e}" for r in loop_rows if "s" in r)
        + f". TL cache path: {tl_path}.",
        f"Goals: {json.dumps(goals)}",
        f"{json.dumps(meta)}",
    ]
    print("\n".join(lines))
    if not args.smoke:
        out = HERE / "results" / "peers.json"
        out.parent.mkdir(exist_ok=True)
        payload = {"meta": meta, "check": check, "loop": loop_rows, "goals": goals, "results": rows}
        out.write_text(json.dumps(payload, indent=1))
        print(out)


if __name__ == "__main__":
    main()
