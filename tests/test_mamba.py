"""Mamba-1 blocks (MambaMixer, FalconMambaMixer, JambaMambaMixer) against an independent float64
per-step recurrence driven by unit impulses, and against the block's real output."""

import contextlib

import pytest
import torch
from conftest import cache_kwarg, output_cache, randomize, rel_err
from mamba_reference import bias_reference, impulse_matrix, reference
from transformers import (
    FalconMambaConfig,
    FalconMambaForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)
from view_checks import cuda_syncs, reads_are_bounded, rows_read_nothing_back

import implicit_hooks as ih

TOL = 1e-5  # float32, relative (Frobenius)
L = 13  # deliberately not a multiple of anything


def mamba(device, *, conv_bias=True, use_bias=True, layers=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=64,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=layers,
        intermediate_size=24,
        conv_kernel=4,
        time_step_rank=3,
        use_conv_bias=conv_bias,
        use_bias=use_bias,
    )
    return randomize(MambaForCausalLM(cfg), seed).to(device=device, dtype=dtype).eval()


def falcon_mamba(device, seed=1):
    torch.manual_seed(seed)
    cfg = FalconMambaConfig(
        vocab_size=64,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        intermediate_size=24,
        conv_kernel=3,
        time_step_rank=4,
        use_conv_bias=True,
        use_bias=False,
    )
    return randomize(FalconMambaForCausalLM(cfg), seed).to(device).eval()


def jamba(device, seed=2):
    torch.manual_seed(seed)
    cfg = JambaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=2,
        num_experts_per_tok=1,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=3,
        mamba_conv_bias=True,
        mamba_proj_bias=True,
    )
    return randomize(JambaForCausalLM(cfg), seed, scale=0.3).to(device).eval()


def padded_batch(device, vocab=64):
    """Batch of 3: left padding in row 0, right padding in row 1, none in row 2."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, L), generator=gen)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def capture_mixers(model, cls):
    """Our own hooks, independent of implicit_hooks: the input and the pre-out_proj output of each mixer."""
    calls, handles = [], []

    def pre(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append({"module": mod, "hidden": hidden.detach(), "mask": kwargs.get("attention_mask")})

    def out_proj(mod, args, out):
        calls[-1]["y"] = args[0].detach()

    for mod in model.modules():
        if isinstance(mod, cls):
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.out_proj.register_forward_hook(out_proj))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def check_record(record, call, norm=None, context=None):
    """Every read of one record against the independent reference of the same call."""
    fr = reference(
        call["module"],
        call["hidden"].cpu(),
        None if call["mask"] is None else call["mask"].cpu(),
        norm=norm,
        context=context,
    )
    view = record.attention
    y_real = call["y"].transpose(1, 2)
    assert rel_err(fr.y.transpose(1, 2), y_real) < TOL, "the reference itself does not reproduce the model"
    assert rel_err(view.dense(), impulse_matrix(fr)) < TOL
    assert rel_err(view.values, fr.x.transpose(1, 2)) < TOL
    assert rel_err(view.bias, bias_reference(fr)) < TOL
    assert rel_err(view.output(), y_real) < TOL
    assert record.output_error() < TOL
    return fr, view


@pytest.mark.parametrize("conv_bias", [True, False])
def test_dense_bias_output_match_impulse_response_every_layer(device, conv_bias):
    model = mamba(device, conv_bias=conv_bias)
    ids, mask = padded_batch(device)
    with torch.no_grad(), capture_mixers(model, type(model.backbone.layers[0].mixer)) as calls:
        with ih.record(model) as rec:
            model(ids, attention_mask=mask)
    assert len(rec) == 3 == len(calls)
    assert [r.name for r in rec] == [f"backbone.layers.{i}.mixer" for i in range(3)]
    for record, call in zip(rec, calls):
        assert record.kind == "mamba" and record.status == "complete"
        fr, view = check_record(record, call)
        assert view.shape == (3, 24, L, L)
        A = view.dense()
        # causal, and padded input columns carry nothing
        assert torch.all(A.triu(1) == 0)
        assert torch.all(A[0, :, :, :3] == 0) and torch.all(A[1, :, :, -2:] == 0)


def test_ablations_match_frozen_recurrence_with_factors_left_out(device):
    model = mamba(device)
    ids, mask = padded_batch(device)
    with torch.no_grad(), capture_mixers(model, type(model.backbone.layers[0].mixer)) as calls:
        with ih.record(model) as rec:
            model(ids, attention_mask=mask)
    fr = reference(calls[1]["module"], calls[1]["hidden"].cpu(), calls[1]["mask"].cpu())
    view = rec[1].attention
    assert view.components == ("gate", "ssm", "skip", "act", "conv")
    cases = {
        "only_ssm": (view.only("ssm"), dict(conv=False, act=False, skip=False, gate=False)),
        "no_conv": (view.without("conv"), dict(conv=False)),
        "no_act": (view.without("act"), dict(act=False)),
        "no_gate": (view.without("gate"), dict(gate=False)),
        "no_skip": (view.without("skip"), dict(skip=False)),
        "gate_ssm": (view.only("gate", "ssm"), dict(conv=False, act=False, skip=False)),
    }
    for name, (ablated, parts) in cases.items():
        assert rel_err(ablated.dense(), impulse_matrix(fr, **parts)) < TOL, name
    # the S6-only matrix is the hidden attention of Ali et al.: no skip on its diagonal
    assert not torch.allclose(view.only("ssm").dense(), view.only("ssm", "skip").dense())
    with pytest.raises(ValueError, match="components are"):
        view.without("norm")


def test_rows_blocks_and_channel_reductions_equal_the_dense_matrix(device):
    model = mamba(device)
    ids, mask = padded_batch(device)
    with torch.no_grad(), ih.record(model) as rec:
        model(ids, attention_mask=mask)
    view = rec[2].attention
    A = view.dense()
    small = view.with_tiles(200)  # forces many channel and row tiles
    for v in (view, small):
        torch.testing.assert_close(v[0, :, -1], A[0, :, -1])
        torch.testing.assert_close(v[1, 5], A[1, 5])
        torch.testing.assert_close(v[:, 3:9, 4:11, 2:7], A[:, 3:9, 4:11, 2:7])
        rows, cols = torch.tensor([12, 0, 5]), [1, 11, 3, 3]
        torch.testing.assert_close(v[2, [0, 7], rows, cols], A[2][[0, 7]][:, rows][:, :, cols])
        torch.testing.assert_close(v[..., -1, :], A[..., -1, :])
        torch.testing.assert_close(v.mean(), A.mean(1))
        torch.testing.assert_close(v.sum(absolute=True), A.abs().sum(1))
        torch.testing.assert_close(v.mean(absolute=True, rows=[-1]), A.abs().mean(1)[:, [-1]])
        groups = torch.arange(24) % 5  # any channel grouping: one reduction per group
        expected = torch.stack([A[:, groups == g].mean(1) for g in range(5)], 1)
        torch.testing.assert_close(v.mean(by=groups.to(device)), expected)
        g, x = torch.randn(3, 24, L, device=device), torch.randn(3, 24, L, device=device)
        weighted = (g[..., :, None] * A * x[..., None, :]).clamp_min(0).mean(1)
        torch.testing.assert_close(v.mean(transform="positive", row_weight=g, col_weight=x), weighted)
        x = torch.randn(3, 24, L, device=device)
        torch.testing.assert_close(v.apply(x), torch.einsum("bctj,bcj->bct", A, x))
        torch.testing.assert_close(v._matvec(x, fast=False), v.apply(x))  # the tiled twin of the scan
    with pytest.raises(IndexError, match="out of range"):
        view[0, 24]
    with pytest.raises(ValueError, match="apply"):
        view.apply(torch.zeros(3, 24, L + 1, device=device))


def test_reads_stored_in_bfloat16(device):
    """``dense(torch.bfloat16)`` and ``with_output_dtype``: the float32 entries, rounded once as they are
    stored, for the dense matrix, rows and blocks; reductions keep the view's dtype."""
    model = mamba(device)
    ids, mask = padded_batch(device)
    with torch.no_grad(), ih.record(model) as rec:
        model(ids, attention_mask=mask)
    view = rec[1].attention.with_tiles(200)  # several tiles, each rounded as it is written
    A = view.dense()
    assert torch.equal(view.dense(torch.bfloat16), A.to(torch.bfloat16))
    narrow = view.with_output_dtype(torch.bfloat16)
    for key in [(0, slice(None), -1), (slice(None), slice(3, 9), slice(4, 11), slice(2, 7))]:
        assert narrow[key].dtype == torch.bfloat16 and torch.equal(narrow[key], A[key].to(torch.bfloat16))
    assert narrow.mean().dtype == torch.float32 and torch.equal(narrow.mean(), view.mean())
    assert narrow.only("ssm").dense().dtype == torch.bfloat16  # derived views keep the setting
    with pytest.raises(ValueError, match="floating dtype"):
        view.with_output_dtype(torch.int32)


def test_reads_only_compute_what_they_return(device):
    """A last-token row asks the core for one row; a channel mean never for more than a tile."""
    model = mamba(device, layers=1)
    ids = torch.randint(0, 64, (1, 40), device=device)
    with torch.no_grad(), ih.record(model) as rec:
        model(ids)
    view = rec[0].attention.with_tiles(4000)
    assert reads_are_bounded(view)
    assert rows_read_nothing_back(view)


def test_falcon_mamba_rms_normed_b_c_delta(device):
    model = falcon_mamba(device)
    ids, mask = padded_batch(device)
    cls = type(model.backbone.layers[0].mixer)
    with torch.no_grad(), capture_mixers(model, cls) as calls, ih.record(model) as rec:
        model(ids, attention_mask=mask)
    assert len(rec) == 2
    for record, call in zip(rec, calls):
        check_record(record, call, norm="weightless")


def test_jamba_mixers_inside_a_hybrid_called_with_keywords(device):
    model = jamba(device)
    ids, mask = padded_batch(device)
    cls = type(model.model.layers[0].mamba)
    with torch.no_grad(), capture_mixers(model, cls) as calls, ih.record(model) as rec:
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    mamba_records = [r for r in rec if r.kind == "mamba"]
    assert [r.name for r in mamba_records] == ["model.layers.0.mamba", "model.layers.2.mamba"]
    for record, call in zip(mamba_records, calls):
        assert call["mask"] is not None  # the hybrid passes its padding mask by keyword
        check_record(record, call, norm="weighted")


def test_logits_bit_identical_and_no_hook_left(device):
    model = mamba(device)
    ids, mask = padded_batch(device)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        with ih.record(model) as rec:
            during = model(ids, attention_mask=mask).logits
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert rec[0].attention.dense().shape == (3, 24, L, L)  # readable after the context


def test_hooks_removed_and_record_refused_when_the_forward_raises(device):
    model = mamba(device)
    ids = torch.randint(0, 64, (2, 9), device=device)

    def boom(mod, args, out):
        raise RuntimeError("boom")

    handle = model.backbone.layers[1].mixer.out_proj.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with ih.record(model) as rec:
            model(ids)
    handle.remove()
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert rec[0].status == "complete" and rec[1].status == "failed"
    with pytest.raises(ih.RecordingError, match="did not finish"):
        rec[1].attention
    assert rec[0].output_error() < TOL


def test_decode_step_and_multi_token_continuation_from_a_cache(device):
    model = mamba(device, layers=2)
    ids = torch.randint(0, 64, (2, 10), device=device)
    kw = cache_kwarg(model)
    cls = type(model.backbone.layers[0].mixer)
    with torch.no_grad():
        with ih.record(model) as prefill:
            out = model(ids[:, :6], use_cache=True)  # the default cached-prefill path
        cache = output_cache(out)
        with capture_mixers(model, cls) as calls, ih.record(model) as cont:
            out = model(ids[:, 6:9], **{kw: cache}, use_cache=True)  # multi-token continuation
        cache = output_cache(out)
        with ih.record(model) as step:
            model(ids[:, 9:10], **{kw: cache}, use_cache=True)  # single-token decode
    for r in [*prefill, *cont, *step]:
        assert r.output_error() < TOL, r.name
    assert step[0].attention.shape == (2, 24, 1, 1)
    assert step[0].raw.get("initial_state") is not None  # the decode step starts from a state…
    assert torch.count_nonzero(step[0].attention.bias) > 0  # …whose contribution is in the bias
    # continuation: the conv reads the previous call's last inputs; the matrix is still the impulse response
    x_prev = prefill[0].attention.values[..., -3:].transpose(1, 2).cpu()
    fr = reference(calls[0]["module"], calls[0]["hidden"].cpu(), context=x_prev)
    assert rel_err(cont[0].attention.dense(), impulse_matrix(fr)) < TOL
    assert rel_err(cont[0].attention.bias, bias_reference(fr)) < TOL


def test_bfloat16_model():
    """bf16 models are explained in float32 from their bf16 recordings; the model itself rounds to bf16
    at every step, so the documented tolerance is 3e-2 (relative, Frobenius)."""
    model = mamba("cpu", dtype=torch.bfloat16)
    ids, mask = padded_batch("cpu")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with ih.record(model) as rec:
            out = model(ids, attention_mask=mask).logits
    assert torch.equal(ref, out)
    for r in rec:
        assert r.attention.dtype == torch.float32
        assert r.output_error() < 3e-2


def test_float64_views_on_request(device):
    model = mamba(device, layers=1)
    ids, mask = padded_batch(device)
    with torch.no_grad(), capture_mixers(model, type(model.backbone.layers[0].mixer)) as calls:
        with ih.record(model) as rec:
            model(ids, attention_mask=mask)
    view = rec[0].view(torch.float64)
    assert view.dtype == torch.float64 and view.dense().dtype == torch.float64
    fr = reference(calls[0]["module"], calls[0]["hidden"].cpu(), calls[0]["mask"].cpu())
    assert rel_err(view.dense(), impulse_matrix(fr)) < TOL
    assert rec[0].output_error(torch.float64) < TOL


def test_layer_selection_and_lookup_by_name(device):
    model = mamba(device)
    ids = torch.randint(0, 64, (1, 5), device=device)
    with torch.no_grad(), ih.record(model, layers=[0, "backbone.layers.2.mixer"]) as rec:
        model(ids)
    assert rec.names() == ["backbone.layers.0.mixer", "backbone.layers.2.mixer"]
    assert rec["backbone.layers.2.mixer"] is rec[1]
    with pytest.raises(KeyError, match="no call"):
        rec["backbone.layers.1.mixer"]
    with pytest.raises(KeyError, match="not a supported block"):
        with ih.record(model, layers=["backbone.layers.9.mixer"]):
            pass


def test_tensors_mapping(device):
    model = mamba(device, layers=1)
    ids, mask = padded_batch(device)
    with torch.no_grad(), capture_mixers(model, type(model.backbone.layers[0].mixer)) as calls:
        with ih.record(model) as rec:
            model(ids, attention_mask=mask)
    t = rec[0].tensors
    for key in ("decay", "gate", "input_proj", "delta", "B", "C", "conv_preact"):
        assert key in t
    fr = reference(calls[0]["module"], calls[0]["hidden"].cpu(), calls[0]["mask"].cpu())
    assert t["decay"].shape == (3, 24, L, 4)
    assert rel_err(t["decay"], torch.exp(fr.delta[..., None] * fr.A).transpose(1, 2)) < TOL
    assert rel_err(t["input_proj"], (fr.delta[..., None] * fr.B[:, :, None, :]).transpose(1, 2)) < TOL
    assert rel_err(t["gate"], torch.nn.functional.silu(fr.z).transpose(1, 2)) < TOL
    assert rel_err(t["conv_preact"], fr.u.transpose(1, 2)) < TOL


def test_gradients_flow_through_views_when_recorded_with_grad(device):
    model = mamba(device, layers=2)
    embeds = model.backbone.embeddings(torch.randint(0, 64, (1, 7), device=device)).detach().requires_grad_()
    with ih.record(model, grad=True) as rec:
        model(inputs_embeds=embeds)
    score = rec[1].attention[0, :, -1].sum()
    (grad,) = torch.autograd.grad(score, embeds)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad(), ih.record(model) as plain:
        model(inputs_embeds=embeds)
    assert not plain[1].attention[0, :, -1].requires_grad


def test_errors_say_what_is_wrong(device):
    with pytest.raises(ih.UnsupportedModelError, match="MambaMixer"):
        with ih.record(torch.nn.Linear(3, 3)):
            pass
    model = mamba(device, layers=1)
    ids = torch.randint(0, 64, (1, 5), device=device)
    with torch.no_grad(), ih.record(model) as rec:
        model(ids)
    view = rec[0].attention
    rec.free()
    with pytest.raises(ih.RecordingError, match="freed"):
        rec[0].attention
    with torch.no_grad(), ih.record(model) as rec:
        model(ids)
    with torch.no_grad():
        model.backbone.layers[0].mixer.A_log.add_(0.1)  # an optimiser step after recording
    with pytest.raises(ih.RecordingError, match="changed in place"):
        rec[0].attention.dense()
    assert view.name == "backbone.layers.0.mixer"


def test_a_weight_replaced_between_forwards_of_one_context_belongs_to_the_later_call(device):
    model = mamba(device, layers=1)
    ids = torch.randint(0, 64, (2, L), device=device)
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad(), ih.record(model) as rec:
        model(ids)
        old = mixer.A_log
        mixer.A_log = torch.nn.Parameter(old - 0.7)  # a new tensor, as load_state_dict(assign=True) makes
        model(ids)
    first, second = rec.calls("backbone.layers.0.mixer")
    assert first.weights["A_log"].data_ptr() == old.data_ptr()
    assert second.weights["A_log"].data_ptr() == mixer.A_log.data_ptr()
    assert first.output_error() < TOL and second.output_error() < TOL  # each explains its own call
    assert rel_err(first.attention.dense(), second.attention.dense()) > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_recording_adds_no_host_synchronisation_on_cuda():
    model = mamba("cuda")
    ids, mask = padded_batch("cuda")

    def recorded():
        with ih.record(model):
            model(ids, attention_mask=mask)

    with torch.no_grad():
        model(ids, attention_mask=mask)  # warm-up
        assert cuda_syncs(recorded) == cuda_syncs(lambda: model(ids, attention_mask=mask))


def test_training_mode_forward_is_recorded_exactly(device):
    """`self.training and cache is None` is the fused-kernel branch; without the kernels HF falls back to
    the torch path, and only in_proj/out_proj are tapped either way."""
    model = mamba(device).train()
    ids, mask = padded_batch(device)
    with ih.record(model) as rec:
        loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()  # recording does not get in the way of training
    assert [r.status for r in rec] == ["complete"] * 3
    for r in rec:
        assert r.output_error() < TOL


def test_generation_records_every_step(device):
    model = mamba(device, layers=2)
    ids = torch.randint(0, 64, (2, 6), device=device)
    with torch.no_grad(), ih.record(model) as rec:
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)
    calls = rec.calls("backbone.layers.1.mixer")
    assert [c.attention.shape[-1] for c in calls] == [6, 1, 1]  # prefill, then one call per new token
    assert all(c.output_error() < TOL for c in rec)
    with pytest.raises(KeyError, match="called 3 times"):
        rec["backbone.layers.1.mixer"]
