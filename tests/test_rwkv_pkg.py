"""The rwkv package's time mixing (RWKV v4, v5, v5.1, v5.2, v6, v7) against an independent float64 per-step
recurrence driven by unit impulses, and against the real time-mix output (replayed by the patcher).

Checkpoints are tiny random ones in the package's own format, loaded by the package with its default settings
(``"cpu fp32"``, or ``"cuda fp32"`` on a GPU; TorchScript on, and off for v4–v6). The package runs one
sequence per call (batch 1) and has no padding.
"""

import time

import pytest
import torch

pytest.importorskip("rwkv")

from conftest import rel_err  # noqa: E402
from rwkv_pkg_reference import bias_reference, capture, impulse_matrix, reference  # noqa: E402
from view_checks import cuda_syncs, reads_are_bounded  # noqa: E402

import implicit_hooks as ih  # noqa: E402
from implicit_hooks.families import rwkv_pkg  # noqa: E402
from implicit_hooks.families.rwkv7 import DeltaRuleCore  # noqa: E402
from implicit_hooks.families.rwkv_pkg import (  # noqa: E402
    DiagonalStateCore,
    checkpoint_version,
    load_checkpoint,
    tiny_checkpoint,
)

TOL = 1e-5  # float32, relative (Frobenius)
L = 13  # deliberately not a multiple of anything
C = 16
VERSIONS = ["4", "5", "5.1", "5.2", "6", "7"]
IDS = torch.randint(0, 64, (80,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(autouse=True)
def true_fp32():
    """rwkv switches TF32 matmuls on when imported; the exactness tests run in true fp32 (restored after)."""
    rwkv_pkg.rwkv_module()
    rwkv_pkg.rwkv_module(v7=True)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def build(version, device, tmp_path, *, jit=True, layers=3, seed=0, dtype="fp32", **kw):
    path = tiny_checkpoint(version, tmp_path / f"v{version}-{seed}.pth", n_layer=layers, seed=seed, **kw)
    return load_checkpoint(path, f"{torch.device(device).type} {dtype}", jit=jit)


def settled(device, fn):
    """``fn()`` once TorchScript has settled. On CUDA the profiling executor optimises (and fuses) compiled
    graphs after their first runs, which can move the last bit of a result: bit-identity is compared
    between runs in the same executor state (on CPU nothing is fused, the first run is compared)."""
    for _ in range(3 if torch.device(device).type == "cuda" else 1):
        out = fn()
    return out


def clone_state(state):
    return None if state is None else [s.clone() for s in state]


def run(model, ids, state=None, **kw):
    return model.forward(list(ids), clone_state(state), **kw)


def recorded(model, ids, state=None):
    """The same call, once under the test's own capture and once under ``ih.record``."""
    with capture(model) as calls:
        run(model, ids, state)
    with ih.record(model) as rec:
        out = run(model, ids, state)
    return calls, rec, out


def check(record, call, tol=TOL):
    """Every read of one record against the independent reference of the same call; returns the errors."""
    fr = reference(call)
    view = record.attention
    y_ref = fr.y.T[None]  # (1, C, L)
    args, out = call["args"], call["out"][0]
    if call["version"] == 7.0:
        model_out = fr.y @ args["output.weight"].double().cpu()
    else:
        x = args["x"].double().cpu()
        model_out = (x if x.dim() == 2 else x[None]) + fr.y @ args["ow"].double().cpu()
    errors = {
        "reference": rel_err(model_out, out if out.dim() == 2 else out[None]),  # the reference is the model
        "replay": rel_err(record.real_output, y_ref),
        "dense": rel_err(view.dense(), impulse_matrix(fr)),
        "bias": rel_err(view.bias, bias_reference(fr)),
        "output": rel_err(view.output(), record.real_output),
        "output_ref": rel_err(view.output(), y_ref),
        "values": rel_err(view.values, fr.v.T[None]),
    }
    assert all(e < tol for e in errors.values()), (record.name, errors)
    assert record.output_error() < tol
    return errors


def kind_of(version):
    return "rwkv" + version[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_matches_the_impulse_response_every_layer(device, version, tmp_path):
    model = build(version, device, tmp_path)
    before = settled(device, lambda: run(model, IDS[:L])[0])
    calls, rec, (during, _) = recorded(model, IDS[:L])
    assert torch.equal(before, during)
    assert [r.name for r in rec] == [f"blocks.{i}.att" for i in range(3)]
    assert all(r.kind == kind_of(version) and r.status == "complete" for r in rec)
    worst = {}
    for record, call in zip(rec, calls):
        assert call["layer"] == int(record.name.split(".")[1])
        for key, e in check(record, call).items():
            worst[key] = max(worst.get(key, 0.0), e)
        A = record.attention.dense()
        assert A.shape == (1, C, L, L) and torch.all(A.triu(1) == 0)  # causal
    print(f"v{version} worst relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


@pytest.mark.parametrize("version", VERSIONS)
def test_continuation_and_decode_from_a_state(device, version, tmp_path):
    """A forward from a given state puts the state's contribution into ``bias``; single tokens take the
    package's ``*_one`` paths."""
    model = build(version, device, tmp_path, layers=2, seed=1)
    _, state = run(model, IDS[:8])
    calls, rec, (_, state2) = recorded(model, IDS[8 : 8 + L], state)  # multi-token continuation
    for record, call in zip(rec, calls):
        check(record, call)
        assert torch.count_nonzero(record.attention.bias) > 0
    calls, rec, _ = recorded(model, IDS[30:31], state2)  # single-token decode
    assert [r.attention.shape for r in rec] == [(1, C, 1, 1)] * 2
    for record, call in zip(rec, calls):
        check(record, call)


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_learned_initial_state(device, version, tmp_path):
    """``time_state`` checkpoints start every sequence from a learned state: it goes to ``bias``."""
    model = build(version, device, tmp_path, layers=2, time_state=True)
    calls, rec, _ = recorded(model, IDS[:L])
    for record, call in zip(rec, calls):
        check(record, call)
        assert torch.count_nonzero(record.tensors["initial_state"]) > 0


@pytest.mark.parametrize("version", ["4", "5", "6", "7"])
def test_ablations_match_the_frozen_recurrence_with_factors_left_out(device, version, tmp_path):
    model = build(version, device, tmp_path, layers=2, seed=2)
    calls, rec, _ = recorded(model, IDS[:L])
    fr = reference(calls[1])
    view = rec[1].attention
    if version == "4":
        assert view.components == ("gate", "ssm")
        cases = {"only_ssm": (view.only("ssm"), dict(gate=False))}
    elif version == "7":
        assert view.components == ("gate", "ssm", "skip")
        cases = {
            "only_ssm": (view.only("ssm"), dict(skip=False, gate=False)),
            "no_skip": (view.without("skip"), dict(skip=False)),
            "no_gate": (view.without("gate"), dict(gate=False)),
            "only_skip": (view.only("skip"), dict(ssm=False, gate=False)),
        }
    else:
        gated = version != "5"
        assert view.components == (("norm", "gate") if gated else ("norm",)) + ("ssm", "skip")
        cases = {
            "only_ssm": (view.only("ssm"), dict(skip=False, norm=False, gate=False)),
            "no_norm": (view.without("norm"), dict(norm=False)),
            "no_skip": (view.without("skip"), dict(skip=False)),
            "norm_skip": (view.only("norm", "skip"), dict(ssm=False, gate=False)),
        }
        if gated:
            cases["no_gate"] = (view.without("gate"), dict(gate=False))
    for name, (ablated, parts) in cases.items():
        assert rel_err(ablated.dense(), impulse_matrix(fr, **parts)) < TOL, name
    with pytest.raises(ValueError, match="components are"):
        view.without("conv")


@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("chunk", [4, None])
def test_rows_blocks_and_channel_reductions_equal_the_dense_matrix(
    device, version, chunk, tmp_path, monkeypatch
):
    """With chunks of 4, L = 13 spans four chunks (the last one partial): every cross-chunk path runs."""
    if chunk is not None:
        monkeypatch.setattr(DeltaRuleCore, "default_chunk", chunk)
        monkeypatch.setattr(DiagonalStateCore, "default_chunk", chunk)
    model = build(version, device, tmp_path, layers=2, seed=3)
    calls, rec, _ = recorded(model, IDS[:L])
    check(rec[1], calls[1])
    view = rec[1].attention
    A = view.dense()
    small = view.with_tiles(500)  # many channel and row tiles
    for v in (view, small):
        torch.testing.assert_close(v.dense(), A)
        torch.testing.assert_close(v[0, :, -1], A[0, :, -1])
        torch.testing.assert_close(v[0, 5], A[0, 5])
        torch.testing.assert_close(v[:, 3:9, 4:11, 2:7], A[:, 3:9, 4:11, 2:7])
        rows, cols = torch.tensor([12, 0, 5, 9]), [1, 11, 3, 3, 8]
        torch.testing.assert_close(v[0, [0, 7, 15], rows, cols], A[0][[0, 7, 15]][:, rows][:, :, cols])
        torch.testing.assert_close(v[..., -1, :], A[..., -1, :])
        torch.testing.assert_close(v.mean(), A.mean(1))
        torch.testing.assert_close(v.sum(absolute=True), A.abs().sum(1))
        heads = torch.arange(C) // 8
        expected = torch.stack([A[:, heads.to(A.device) == h].mean(1) for h in range(2)], 1)
        torch.testing.assert_close(v.mean(by="heads"), expected)
        g, x = torch.randn(1, C, L, device=device), torch.randn(1, C, L, device=device)
        weighted = (g[..., :, None] * A * x[..., None, :]).clamp_min(0).mean(1)
        torch.testing.assert_close(v.mean(transform="positive", row_weight=g, col_weight=x), weighted)
        torch.testing.assert_close(v.apply(x), torch.einsum("bctj,bcj->bct", A, x))
        torch.testing.assert_close(v._matvec(x, fast=False), v.apply(x))  # the tiled twin of the scan
    with pytest.raises(IndexError, match="out of range"):
        view[0, C]


@pytest.mark.parametrize("version", ["6", "7"])
def test_longer_sequence_with_the_default_chunks(device, version, tmp_path):
    """L = 77 crosses the default chunks of 32 (two full, one partial)."""
    model = build(version, device, tmp_path, layers=1, seed=4)
    calls, rec, _ = recorded(model, IDS[:77])
    errors = check(rec[0], calls[0])  # asserts every read against the reference
    assert max(errors.values()) < TOL


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("jit", [True, False])
def test_output_bit_identical_and_instance_restored(device, version, jit, tmp_path):
    if version == "7" and not jit:
        pytest.skip("RWKV-7 is always TorchScript in the package")
    model = build(version, device, tmp_path, jit=jit)
    assert isinstance(model, torch.jit.ScriptModule) == jit
    inner = model.__dict__.get("_actual_script_module")

    def attributes():
        return dict(model.__dict__), None if inner is None else dict(inner.__dict__)

    def calls():
        out, state = run(model, IDS[:L])
        full = run(model, IDS[:L], full_output=True)[0]
        one, state_one = run(model, IDS[L : L + 1], state)
        return [out, full, one, *state, *state_one]

    before_attrs = attributes()
    # TorchScript optimises a graph after its first runs (on CUDA it may then fuse elementwise ops, which can
    # move the last bit): compare runs in the same executor state, the first ones and warmed-up ones.
    plain = [calls() for _ in range(3)]
    with ih.record(model) as rec:
        during = [calls() for _ in range(3)]
    assert attributes() == before_attrs
    after = calls()
    pairs = [(plain[-1], during[-1]), (plain[-1], after)]
    if device.type == "cpu":
        pairs.append((plain[0], during[0]))
    for a, b in pairs:
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(rec) == 27 and all(r.output_error() < TOL for r in rec[:9])


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
@pytest.mark.parametrize("strategy, tol", [("fp32i8", TOL), ("bf16", 3e-2), ("fp16", 5e-3)])
def test_quantised_and_half_precision_strategies(device, version, strategy, tol, tmp_path):
    """int8 weights are dequantised as the package does (exact); bf16/fp16 models are explained in float32
    from their recordings, against outputs the model itself rounded."""
    if version == "7" and strategy == "fp32i8":
        pytest.skip("RWKV-7 strategies have no int8 weights")
    model = build(version, device, tmp_path, layers=2, dtype=strategy)
    before = settled(device, lambda: run(model, IDS[:L])[0])
    with ih.record(model) as rec:
        during = run(model, IDS[:L])[0]
    assert torch.equal(before, during)
    for r in rec:
        assert r.attention.dtype == torch.float32 and r.output_error() < tol


def test_chunked_and_direct_blocks_agree():
    """The default assembly of the RWKV-5/6 core against its one-exponential-per-entry twin."""
    gen = torch.Generator().manual_seed(0)
    r, k = torch.randn(1, 3, 50, 5, generator=gen), torch.randn(1, 3, 50, 5, generator=gen)
    log_decay = -3 * torch.rand(1, 3, 50, 5, generator=gen)
    core = DiagonalStateCore(r, k, log_decay, torch.randn(3, 5, generator=gen), torch.float32, chunk=8)
    heads = torch.tensor([0, 2])
    for rows, cols in [
        (torch.arange(50), torch.arange(50)),
        (torch.tensor([49, 3, 17, 8, 8]), torch.tensor([0, 48, 7, 8, 16, 16, 33])),
        (torch.tensor([40]), torch.arange(50)),
    ]:
        torch.testing.assert_close(core.chunked(0, heads, rows, cols), core.direct(0, heads, rows, cols))


@pytest.mark.parametrize("version", ["6", "7"])
def test_nested_recordings_both_see_every_call(device, version, tmp_path):
    model = build(version, device, tmp_path, layers=2)
    before = settled(device, lambda: [run(model, ids)[0] for ids in (IDS[:5], IDS[:L], IDS[:3])])
    attributes = dict(model.__dict__)
    with ih.record(model) as outer:
        first = run(model, IDS[:5])[0]
        with ih.record(model) as inner:
            during = run(model, IDS[:L])[0]
            assert inner[1].output_error() < TOL  # its replay is not recorded by either context
        last = run(model, IDS[:3])[0]
    assert all(torch.equal(x, y) for x, y in zip(before, [first, during, last]))
    assert dict(model.__dict__) == attributes
    assert [r.attention.shape[-1] for r in outer] == [5, 5, L, L, 3, 3]
    assert [r.attention.shape[-1] for r in inner] == [L, L]
    assert rel_err(outer[2].attention.dense(), inner[0].attention.dense()) == 0


def test_jit_off_records_the_same_matrices(device, tmp_path):
    on = build("6", device, tmp_path, seed=5)
    off = build("6", device, tmp_path, seed=5, jit=False)
    with ih.record(on) as rec_on:
        run(on, IDS[:L])
    calls, rec_off, _ = recorded(off, IDS[:L])
    for a, b, call in zip(rec_on, rec_off, calls):
        check(b, call)
        assert rel_err(a.attention.dense(), b.attention.dense()) < TOL


def test_layers_are_identified_by_their_weights_not_by_call_order(device, tmp_path):
    model = build("6", device, tmp_path)
    with capture(model) as calls:
        run(model, IDS[:L])
    args = list(calls[2]["args"].values())
    with ih.record(model) as rec:
        run(model, IDS[:5])
        model.att_seq_v6_0(*args)  # layer 2's time mix, called on its own
        run(model, IDS[:7])
    assert rec.names() == ["blocks.0.att", "blocks.1.att", "blocks.2.att", "blocks.2.att"] + [
        f"blocks.{i}.att" for i in range(3)
    ]
    assert [c.attention.shape[-1] for c in rec.calls("blocks.2.att")] == [5, L, 7]
    check(rec[3], calls[2])
    with pytest.raises(KeyError, match="called 3 times"):
        rec["blocks.2.att"]


def test_a_model_inside_a_module_gets_prefixed_names(device, tmp_path):
    model = build("7", device, tmp_path, layers=2)
    holder = torch.nn.Module()
    holder.lm = model
    with ih.record(holder) as rec:
        run(model, IDS[:L])
    assert rec.names() == ["lm.blocks.0.att", "lm.blocks.1.att"]


@pytest.mark.parametrize("version", ["6", "7"])
def test_tensors_mapping(device, version, tmp_path):
    model = build(version, device, tmp_path, layers=2)
    calls, rec, _ = recorded(model, IDS[:L])
    fr = reference(calls[1])
    t = rec[1].tensors
    for key in ("values", "receptance", "key", "decay", "log_decay", "gate", "norm", "wkv", "initial_state"):
        assert key in t
    assert t["decay"].shape == (1, C, L) and t["initial_state"].shape == (1, 2, 8, 8)
    assert rel_err(t["decay"], fr.decay.T[None]) < TOL
    assert rel_err(t["gate"], fr.gate.T[None]) < TOL
    assert rel_err(t["norm"], (fr.gamma / fr.std.repeat_interleave(8, 1)).T[None]) < TOL
    assert rel_err(t["values"], fr.v.T[None]) < TOL
    if version == "7":
        for key in ("v_first", "value_residual", "value_proj", "key_norm", "in_context_rate", "bonus"):
            assert key in t
        assert rel_err(t["key_norm"], fr.kappa.T[None]) < TOL


def test_float64_views_on_request(device, tmp_path):
    model = build("7", device, tmp_path, layers=1)
    calls, rec, _ = recorded(model, IDS[:L])
    view = rec[0].view(torch.float64)
    assert view.dense().dtype == torch.float64
    assert rel_err(view.dense(), impulse_matrix(reference(calls[0]))) < TOL
    assert rec[0].output_error(torch.float64) < TOL


@pytest.mark.parametrize("version", ["6", "7"])
def test_reads_only_compute_what_they_return(device, version, tmp_path):
    model = build(version, device, tmp_path, layers=1)
    with ih.record(model) as rec:
        run(model, IDS[:40])
    view = rec[0].attention.with_tiles(3000)
    assert reads_are_bounded(view)
    core = view.factors.core
    asked = []
    original = core.head_block

    def spy(b, heads, rows, cols):
        asked.append((len(heads), len(rows), len(cols)))
        return original(b, heads, rows, cols)

    core.head_block = spy
    view[0, :, -1]
    assert {r for _, r, _ in asked} == {1}
    assert sum(h for h, _, _ in asked) == 2  # each head once, though the tile holds 8 channels of it
    asked.clear()
    view.mean()
    assert max(h * r * k * core.work_per_entry for h, r, k in asked) <= 3000


def test_errors_say_what_is_wrong(device, tmp_path):
    model = build("6", device, tmp_path, layers=2)
    with ih.record(model) as rec:
        run(model, IDS[:5])
    rec.free()
    with pytest.raises(ih.RecordingError, match="freed"):
        rec[0].attention
    with ih.record(model) as rec:
        run(model, IDS[:5])
    model.w["blocks.0.att.time_decay"].add_(0.1)  # a weight changed after recording
    with pytest.raises(ih.RecordingError, match="changed in place"):
        rec[0].attention.dense()
    model.w["blocks.0.att.time_decay"].sub_(0.1)
    # a time mix that raises: its record is refused, the instance is restored
    bad = [torch.zeros(C, device=device), torch.zeros(3, device=device), torch.zeros(C, device=device)] * 2
    with pytest.raises(RuntimeError), ih.record(model) as rec:
        model.forward(IDS[:5], bad)
    assert rec[0].status == "failed" and "att_seq_v6_0" not in model.__dict__
    with pytest.raises(ih.RecordingError, match="did not finish"):
        rec[0].attention
    # a group norm weight with an exact zero cannot carry ln_x.bias through its frozen scale
    model.w["blocks.1.att.ln_x.weight"][3] = 0.0
    with ih.record(model) as rec:
        run(model, IDS[:5])
    with pytest.raises(ih.UnsupportedInputError, match="exact zeros"):
        rec[1].attention.dense()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth")


def test_checkpoints_of_every_version(tmp_path):
    for version in VERSIONS:
        path = tiny_checkpoint(version, tmp_path / f"{version}.pth")
        assert checkpoint_version(path) == float(version)
        model = load_checkpoint(path)
        assert model.version == float(version) if version != "7" else type(model).__name__ == "RWKV_x070"
    with pytest.raises(ValueError, match="version"):
        tiny_checkpoint("8", tmp_path / "x.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("version", ["4", "6", "7"])
def test_recording_adds_no_host_synchronisation_on_cuda(version, tmp_path):
    model = build(version, "cuda", tmp_path)

    def recorded_call():
        with ih.record(model):
            run(model, IDS[:L])

    for _ in range(3):  # warm-up: TorchScript's first runs profile the graphs
        run(model, IDS[:L])
        recorded_call()
    assert cuda_syncs(recorded_call) == cuda_syncs(lambda: run(model, IDS[:L]))


def strategy_report(device, version, dtype, tmp_path, *, n_embd=256, ref_length=96, time_length=1024):
    """Errors against the float64 reference at ``ref_length`` and timings of recording and reads at
    ``time_length``, for a model with head size 64; returns ``(worst errors, output error, timings)``."""
    device = torch.device(device)
    model = build(
        version, device, tmp_path, layers=2, n_embd=n_embd, head_size=64, vocab=256, ffn=512, dtype=dtype
    )
    ids = torch.randint(0, 256, (time_length,), generator=torch.Generator().manual_seed(0)).tolist()
    calls, rec, _ = recorded(model, ids[:ref_length])
    worst = {}
    for record, call in zip(rec, calls):
        fr = reference(call)
        errors = {
            "dense": rel_err(record.attention.dense(), impulse_matrix(fr)),
            "bias": rel_err(record.attention.bias, bias_reference(fr)),
            "output": record.output_error(),
            "output_ref": rel_err(record.attention.output(), fr.y.T[None]),
        }
        worst = {k: max(worst.get(k, 0.0), e) for k, e in errors.items()}

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(model, ids)  # warm-up
    timings = {"forward": timed(lambda: run(model, ids))}
    with ih.record(model) as rec:
        timings["recorded forward"] = timed(lambda: run(model, ids))
    view = rec[1].attention
    timings["factors"] = timed(lambda: view.factors)
    timings["last row"] = timed(lambda: view[0, :, -1])
    timings["channel mean (L×L)"] = timed(lambda: view.mean())
    timings["output()"] = timed(lambda: view.output())
    return worst, rec[1].output_error(), timings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_strategy_timings_and_errors(version, dtype, tmp_path):
    """``"cuda fp32"`` (TF32 off) and ``"cuda fp16"`` at head size 64 (C = 256): errors against the float64
    reference at L = 96, timings at L = 1024. Prints its numbers (run with ``-s``)."""
    worst, error, timings = strategy_report("cuda", version, dtype, tmp_path)
    print(f"\nv{version} cuda {dtype} L=96 worst: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    print(
        f"v{version} cuda {dtype} L=1024 C=256: "
        + ", ".join(f"{k} {t:.3f}s" for k, t in timings.items())
        + f", output error {error:.1e}"
    )
    tol = TOL if dtype == "fp32" else 3e-2
    assert all(e < tol for e in worst.values()), worst
    assert error < tol
