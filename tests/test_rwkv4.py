"""RWKV-4 time mixing (RwkvSelfAttention) against an independent float64 per-step WKV (the running-maximum
loop of the model's own CPU kernel) driven by unit impulses, and against the block's real output."""

import collections
import contextlib
import copy
import os

import pytest
import torch
from conftest import randomize, rel_err
from rwkv4_reference import bias_reference, impulse_matrix, reference
from transformers import RwkvConfig, RwkvForCausalLM
from transformers.models.rwkv import modeling_rwkv
from view_checks import cuda_syncs, reads_are_bounded, rows_read_nothing_back

import implicit_hooks as ih

TOL = 1e-5  # float32, relative (Frobenius)
L = 13  # deliberately not a multiple of anything
C = 16


def rwkv(device, *, layers=3, dtype=torch.float32, seed=0, randomized=True):
    torch.manual_seed(seed)
    cfg = RwkvConfig(
        vocab_size=64,
        hidden_size=C,
        attention_hidden_size=C,
        intermediate_size=32,
        num_hidden_layers=layers,
        context_length=64,
        rescale_every=2,
    )
    model = RwkvForCausalLM(cfg)
    model = randomize(model, seed) if randomized else model
    return model.to(device=device, dtype=dtype).eval()


def tokens(device, batch=3, length=L, seed=7):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def wkv(rec):
    return [r for r in rec if r.kind != "attention"]


@contextlib.contextmanager
def capture_attention(model):
    """Our own hooks, independent of implicit_hooks: each time mixing's input, copies of the state it starts
    from (the forward overwrites it in place) and its output before the output projection."""
    calls, handles = [], []

    def pre(mod, args, kwargs):
        state = kwargs.get("state")
        start = None
        if state is not None:
            start = [state[i][:, :, mod.layer_id].detach().clone() for i in (1, 2, 3, 4)]
        calls.append({"module": mod, "hidden": args[0].detach(), "state": start})

    def out(mod, args, output):
        calls[-1]["y"] = args[0].detach().clone()

    for mod in model.modules():
        if isinstance(mod, modeling_rwkv.RwkvSelfAttention):
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.output.register_forward_hook(out))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def check_record(record, call):
    """Every read of one record against the independent reference of the same call."""
    fr = reference(call["module"], call["hidden"], call["state"])
    view = record.attention
    y_real = call["y"].transpose(1, 2)
    errors = {
        "reference": rel_err(fr.y.transpose(1, 2), y_real),  # the reference reproduces the model
        "dense": rel_err(view.dense(), impulse_matrix(fr)),
        "values": rel_err(view.values, fr.value.transpose(1, 2)),
        "output": rel_err(view.output(), y_real),
        "output_error": record.output_error(),
    }
    for name, err in errors.items():
        assert err < TOL, (record.name, name, err)
    bias = bias_reference(fr)
    if bias.abs().max() > 0:
        assert rel_err(view.bias, bias) < TOL
    else:
        assert torch.all(view.bias == 0)
    return fr, view


@pytest.mark.parametrize("use_cache", [True, False])
def test_dense_bias_output_match_impulse_response_every_layer(device, use_cache):
    """use_cache=True (the eval default) hands every layer a fresh zero state; False none."""
    model = rwkv(device)
    ids = tokens(device)
    with torch.no_grad(), capture_attention(model) as calls, ih.record(model) as rec:
        model(ids, use_cache=use_cache)
    records = wkv(rec)
    assert [r.name for r in records] == [f"rwkv.blocks.{i}.attention" for i in range(3)]
    for record, call in zip(records, calls):
        assert record.kind == "rwkv4" and record.status == "complete"
        assert ("initial_state" in record.raw) == use_cache
        _, view = check_record(record, call)
        assert view.shape == (3, C, L, L)
        assert torch.all(view.dense().triu(1) == 0)


def test_rows_of_the_recurrence_factor_sum_to_one(device):
    model = rwkv(device)
    with torch.no_grad(), ih.record(model) as rec:
        model(tokens(device))
    for record in wkv(rec):
        R = record.attention.only("ssm").dense()
        assert torch.all(R >= 0)
        torch.testing.assert_close(R.sum(-1), torch.ones_like(R[..., 0]), rtol=0, atol=1e-6)


def test_large_keys_do_not_overflow(device):
    """Keys beyond ±30 and fast decays: a plain exp(k) · exp(j·w) formulation overflows float32; the
    running maximum (in the model) and log space (in the view) do not."""
    model = rwkv(device, layers=2)
    with torch.no_grad():
        for block in model.rwkv.blocks:
            block.attention.key.weight.mul_(25.0)
            block.attention.time_decay.add_(2.5)  # w = exp(time_decay) ≈ 12 per step
    ids = tokens(device)
    with torch.no_grad(), capture_attention(model) as calls, ih.record(model) as rec:
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    for record, call in zip(wkv(rec), calls):
        key = record.tensors["key"]
        w = record.tensors["decay_rate"]
        assert key.abs().max() > 30
        assert not torch.isfinite(torch.exp(key + w[:, None] * torch.arange(L, device=device))).all()
        check_record(record, call)
        R = record.attention.only("ssm").dense()
        assert torch.isfinite(R).all()
        torch.testing.assert_close(R.sum(-1), torch.ones_like(R[..., 0]), rtol=0, atol=1e-6)


def test_ablations_match_frozen_wkv_with_factors_left_out(device):
    model = rwkv(device)
    with torch.no_grad(), capture_attention(model) as calls, ih.record(model) as rec:
        model(tokens(device))
    fr = reference(calls[1]["module"], calls[1]["hidden"], calls[1]["state"])
    view = wkv(rec)[1].attention
    assert view.components == ("gate", "ssm")
    assert rel_err(view.without("gate").dense(), impulse_matrix(fr, gate=False)) < TOL
    assert rel_err(view.only("ssm").dense(), impulse_matrix(fr, gate=False)) < TOL
    assert torch.all(view.only("gate").dense() == 0)
    with pytest.raises(ValueError, match="components are"):
        view.without("conv")


def test_rows_blocks_and_channel_reductions_equal_the_dense_matrix(device):
    model = rwkv(device)
    with torch.no_grad(), ih.record(model) as rec:
        model(tokens(device))
    view = wkv(rec)[2].attention
    A = view.dense()
    small = view.with_tiles(200)  # forces many channel and row tiles
    assert view.groups == {}  # RWKV-4 mixes per channel: no heads
    for v in (view, small):
        torch.testing.assert_close(v[0, :, -1], A[0, :, -1])
        torch.testing.assert_close(v[1, 5], A[1, 5])
        torch.testing.assert_close(v[:, 3:9, 4:11, 2:7], A[:, 3:9, 4:11, 2:7])
        rows, cols = torch.tensor([12, 0, 5]), [1, 11, 3, 3]
        torch.testing.assert_close(v[2, [0, 7], rows, cols], A[2][[0, 7]][:, rows][:, :, cols])
        torch.testing.assert_close(v.mean(), A.mean(1))
        torch.testing.assert_close(v.sum(absolute=True), A.abs().sum(1))
        torch.testing.assert_close(v.mean(rows=[-1], cols=slice(0, 6)), A.mean(1)[:, [-1], :6])
        groups = torch.arange(C) % 3
        expected = torch.stack([A[:, groups == g].mean(1) for g in range(3)], 1)
        torch.testing.assert_close(v.mean(by=groups.to(device)), expected)
        x = torch.randn(3, C, L, device=device)
        torch.testing.assert_close(v.apply(x), torch.einsum("bctj,bcj->bct", A, x))
    with pytest.raises(ValueError, match="no channel grouping"):
        view.mean(by="heads")


@pytest.mark.parametrize("key_scale", [1.0, 100.0])
def test_matvec_in_log_space(device, key_scale):
    """``apply`` sums ``R @ x`` in ``O(L)`` (float64 log space, the positive and negative parts of ``x``
    apart): it equals the dense matrix times ``x`` for signed ``x`` with exact zeros and for keys where
    ``exp(k)`` overflows float32."""
    model = rwkv(device)
    with torch.no_grad():
        for block in model.rwkv.blocks:
            block.attention.key.weight.mul_(key_scale)
    with torch.no_grad(), ih.record(model) as rec:
        model(tokens(device))
    for r in wkv(rec):
        assert key_scale == 1.0 or r.attention.factors.core.key.abs().max() > 89  # e^89 overflows float32
        A = r.attention.dense()
        x = torch.randn(3, C, L, device=device)
        x[:, :, 4] = 0
        x[:, 2] = 0
        torch.testing.assert_close(r.attention.apply(x), torch.einsum("bctj,bcj->bct", A, x))
        assert r.output_error() < 1e-5


def test_continuation_and_decode_from_a_state_put_it_into_bias(device):
    """The state (shift, num, den, max) is overwritten in place by each call: the record keeps copies."""
    model = rwkv(device)
    ids = tokens(device, batch=2, length=12)
    with torch.no_grad():
        state = model(ids[:, :5], use_cache=True).state
        with capture_attention(model) as calls, ih.record(model) as cont:
            state = model(ids[:, 5:11], state=state, use_cache=True).state
        one = [s[:1].clone() for s in state]  # decode one sequence (batch > 1 decode is broken in HF)
        with capture_attention(model) as step_calls, ih.record(model) as step:
            model(ids[:1, 11:12], state=one, use_cache=True)
        state[2].add_(1.0)  # whatever happens to the caller's state later does not reach the records
    for record, call in [*zip(wkv(cont), calls), *zip(wkv(step), step_calls)]:
        fr, view = check_record(record, call)
        assert view.factors.state_offset.abs().sum() > 0
        # with a carried state the rows give the state its share: Σ_j R[t, j] < 1
        R = view.only("ssm").dense()
        assert torch.all(R.sum(-1) < 1)
        den_share = fr.den[:, :, None] * torch.exp(
            fr.max[:, :, None] - fr.w[:, None] * torch.arange(R.shape[-1])
        )
        z = torch.exp(record.tensors["log_normaliser"].double().cpu())
        assert rel_err(R.sum(-1).double().cpu() + den_share / z, torch.ones_like(z)) < TOL
    assert wkv(step)[0].attention.shape == (1, C, 1, 1)


def test_batched_single_token_decode_is_refused(device):
    """HF broadcasts the shift state across the batch for one token: keys come out (B, B, C)."""
    model = rwkv(device, layers=2)
    ids = tokens(device, batch=2, length=6)
    with torch.no_grad():
        state = model(ids[:, :5], use_cache=True).state
        with ih.record(model) as rec:
            model(ids[:, 5:6], state=state, use_cache=True)
    with pytest.raises(ih.UnsupportedInputError, match="broadcasts the token-shift state"):
        wkv(rec)[0].attention.dense()


def test_first_eval_forward_rescales_weights_and_logits_stay_bit_identical(device):
    """The first eval forward divides output/value weights in place; recording must change nothing."""
    model = rwkv(device)
    twin = copy.deepcopy(model)
    ids = tokens(device)
    assert not model.rwkv.layers_are_rescaled
    with torch.no_grad():
        with capture_attention(model) as calls, ih.record(model) as rec:
            during = model(ids).logits  # rescales inside, before the blocks run
        before = twin(ids).logits
        after = model(ids).logits
        model.train()
        model.eval()  # undone and redone: output weights change in place again
        again = model(ids).logits
    assert model.rwkv.layers_are_rescaled
    assert torch.equal(before, during) and torch.equal(during, after) and torch.equal(after, again)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    for record, call in zip(wkv(rec), calls):
        check_record(record, call)


def test_tensors_mapping(device):
    model = rwkv(device)
    with torch.no_grad(), capture_attention(model) as calls, ih.record(model) as rec:
        model(tokens(device))
    t = wkv(rec)[0].tensors
    fr = reference(calls[0]["module"], calls[0]["hidden"], calls[0]["state"])
    for key, ref in {"values": fr.value, "key": fr.key, "gate": fr.receptance}.items():
        assert t[key].shape == (3, C, L), key
        assert rel_err(t[key], ref.transpose(1, 2)) < TOL, key
    assert rel_err(t["decay_rate"], fr.w) < TOL and rel_err(t["bonus"], fr.u) < TOL
    assert rel_err(t["decay"], torch.exp(-fr.w)) < TOL
    assert t["initial_state"].shape == (3, 3, C)
    assert rel_err(torch.sigmoid(t["receptance"]), t["gate"]) < TOL


def test_float64_views_on_request(device):
    model = rwkv(device, layers=2)
    with torch.no_grad(), capture_attention(model) as calls, ih.record(model) as rec:
        model(tokens(device))
    view = wkv(rec)[0].view(torch.float64)
    assert view.dtype == torch.float64
    fr = reference(calls[0]["module"], calls[0]["hidden"], calls[0]["state"])
    assert rel_err(view.dense(), impulse_matrix(fr)) < TOL
    assert wkv(rec)[0].output_error(torch.float64) < TOL


def test_bfloat16_model():
    """time_decay/time_first stay float32 (HF keeps them so); the rest is bf16: tolerance 3e-2."""
    model = rwkv("cpu", dtype=torch.bfloat16)
    ids = tokens("cpu")
    with torch.no_grad():
        ref = model(ids).logits
        with ih.record(model) as rec:
            out = model(ids).logits
    assert torch.equal(ref, out)
    for r in wkv(rec):
        assert r.attention.dtype == torch.float32
        assert r.output_error() < 3e-2


def test_gradients_flow_through_views_when_recorded_with_grad(device):
    """use_cache=False: with a state the model itself cannot backpropagate (it overwrites it in place)."""
    model = rwkv(device, layers=2)
    embeds = model.rwkv.embeddings(tokens(device, batch=1, length=7)).detach().requires_grad_()
    with ih.record(model, grad=True) as rec:
        model(inputs_embeds=embeds, use_cache=False)
    score = wkv(rec)[1].attention[0, :, -1].sum()
    (grad,) = torch.autograd.grad(score, embeds, retain_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    (grad,) = torch.autograd.grad(wkv(rec)[1].attention.output().sum(), embeds)  # through the O(L) matvec
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def wkv_cuda_kernel():
    """The RWKV CUDA kernel the model would use, or None.

    transformers 5.x fetches it from the hub (package ``kernels``), which machines without network cannot
    do. The same kernel ships as source in transformers 4.x (``transformers/kernels/rwkv/``: ``wkv_op.cpp``,
    ``wkv_cuda.cu``, ``wkv_cuda_bf16.cu``): with ``RWKV_WKV_SOURCES`` naming a folder holding them, it is
    compiled here exactly as transformers 4.x's ``load_wkv_cuda_kernel`` did (same flags, ``Tmax = 64``).
    """
    if not torch.cuda.is_available():
        return None
    if modeling_rwkv.rwkv_cuda_kernel is not None:
        return modeling_rwkv.rwkv_cuda_kernel
    folder = os.environ.get("RWKV_WKV_SOURCES")
    if not folder:
        return None
    from torch.utils.cpp_extension import load

    flags = ["-res-usage", "--maxrregcount 60", "--use_fast_math", "-O3", "-Xptxas -O3"]
    flags += ["--extra-device-vectorization", "-DTmax=64"]
    sources = [os.path.join(folder, f) for f in ("wkv_op.cpp", "wkv_cuda.cu", "wkv_cuda_bf16.cu")]
    kernel = load(name="wkv_64", sources=sources, extra_cuda_cflags=flags)
    kernel.max_seq_length = 64
    return kernel


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU and the RWKV CUDA kernel (see wkv_cuda_kernel)"
)
def test_cuda_kernel_path(monkeypatch):
    """The fused WKV kernel (with and without a state) against the same float64 reference."""
    kernel = wkv_cuda_kernel()
    if kernel is None:
        pytest.skip("no RWKV CUDA kernel: set RWKV_WKV_SOURCES to transformers 4.x's kernels/rwkv folder")
    model = rwkv("cuda")
    used = collections.Counter()

    class Counted:  # the real kernel, counting which of its entry points the model calls
        max_seq_length = kernel.max_seq_length

        def __getattr__(self, name):
            def call(*args):
                used[name] += 1
                return getattr(kernel, name)(*args)

            return call

    monkeypatch.setattr(modeling_rwkv, "rwkv_cuda_kernel", Counted())  # where transformers' loader puts it
    ids = tokens("cuda", batch=2, length=32)  # batch · hidden must be a multiple of 32 for the kernel
    with torch.no_grad():
        ref = [model(ids, use_cache=False).logits, model(ids).logits]
        with capture_attention(model) as calls, ih.record(model) as rec:
            out = [model(ids, use_cache=False).logits, model(ids).logits]
            state = model(ids[:, :20], use_cache=True).state
            model(ids[:, 20:], state=state, use_cache=True)  # the kernel's forward_with_state
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert used["forward"] > 0 and used["forward_with_state"] > 0  # both kernel paths ran
    records = wkv(rec)
    assert len(records) == len(calls) == 12
    worst = 0.0
    for record, call in zip(records, calls):
        check_record(record, call)
        worst = max(worst, record.output_error())
    print(f"RWKV CUDA kernel path: worst output error {worst:.2e} over {len(records)} calls")


def test_reads_only_compute_what_they_return(device):
    """A last-token row asks the core for one row; a channel mean never for more than a tile."""
    model = rwkv(device, layers=2)
    with torch.no_grad(), ih.record(model) as rec:
        model(tokens(device, batch=1, length=40))
    view = wkv(rec)[0].attention.with_tiles(4000)
    assert reads_are_bounded(view)
    assert rows_read_nothing_back(view)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_recording_adds_no_host_synchronisation_on_cuda():
    model = rwkv("cuda")
    ids = tokens("cuda")

    def recorded():
        with ih.record(model):
            model(ids)

    with torch.no_grad():
        model(ids)  # warm-up
        assert cuda_syncs(recorded) == cuda_syncs(lambda: model(ids))
