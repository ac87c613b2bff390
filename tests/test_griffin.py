"""RG-LRU blocks (RecurrentGemmaRecurrentBlock) against an independent float64 per-step recurrence driven by
unit impulses, and against the block's real output. Attention records (another family) are filtered out."""

import contextlib
import inspect

import pytest
import torch
from conftest import randomize, rel_err
from griffin_reference import bias_reference, impulse_matrix, reference
from transformers import DynamicCache, RecurrentGemmaConfig, RecurrentGemmaForCausalLM
from view_checks import cuda_syncs, reads_are_bounded, rows_read_nothing_back

import implicit_hooks as ih
from implicit_hooks.families.griffin import RGLRUCore

TOL = 1e-5  # float32, relative (Frobenius)
L = 13  # deliberately not a multiple of anything
C = 24  # lru_width (≠ hidden_size, so shapes cannot be confused)
WIDTH = 12  # channels per head: 2 heads


def griffin(device, *, layers=4, activation="gelu_pytorch_tanh", dtype=torch.float32, seed=0):
    """Recurrent, recurrent, attention, recurrent: three RG-LRU blocks and a local-attention layer."""
    torch.manual_seed(seed)
    cfg = RecurrentGemmaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        lru_width=C,
        attention_window_size=8,
        conv1d_width=4,
        hidden_activation=activation,
        block_types=("recurrent", "recurrent", "attention"),
    )
    return randomize(RecurrentGemmaForCausalLM(cfg), seed).to(device=device, dtype=dtype).eval()


def cache_kwarg(model) -> str:
    """transformers 5.2x: `cache`; 5.17: `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def batch_with_resets(device, vocab=64):
    """Batch of 3: row 0 one sequence; row 1 two packed sequences (reset at 6); row 2 left-padded (the
    positions generate() gives: 1 on padding, 0 at the first real token)."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, L), generator=gen)
    pos = torch.arange(L).repeat(3, 1)
    pos[1, 6:] = torch.arange(L - 6)
    pos[2] = torch.tensor([1, 1, 1] + list(range(L - 3)))
    return ids.to(device), pos.to(device)


def rglru(rec):
    return [r for r in rec if r.kind != "attention"]


@contextlib.contextmanager
def capture_blocks(model):
    """Our own hooks, independent of implicit_hooks: each block's input, position_ids, starting states (read
    by the RG-LRU itself, and the conv state on decode) and the output before linear_out."""
    calls, handles = [], []

    def pre(mod, args, kwargs):
        pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        calls.append({"module": mod, "hidden": args[0].detach(), "pos": pos, "conv_state": None})

    def lru_pre(mod, args):
        h0 = mod.recurrent_states
        calls[-1]["h0"] = None if h0 is None else h0.detach().clone()
        # the decode branch computes the conv by hand from conv1d_state before this call
        if args[0].shape[1] == 1 and calls[-1]["module"].conv1d_state is not None:
            calls[-1]["decode"] = True

    def conv_state_pre(mod, args, kwargs):
        calls[-1]["conv_state_before"] = (
            None if mod.conv1d_state is None else mod.conv1d_state.detach().clone()
        )

    def out(mod, args, output):
        calls[-1]["y"] = args[0].detach()

    for mod in model.modules():
        if type(mod).__name__ == "RecurrentGemmaRecurrentBlock":
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_pre_hook(conv_state_pre, with_kwargs=True))
            handles.append(mod.rg_lru.register_forward_pre_hook(lru_pre))
            handles.append(mod.linear_out.register_forward_hook(out))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def frozen_of(call, activation="gelu_pytorch_tanh"):
    context = None
    if call.get("decode"):
        context = call["conv_state_before"].transpose(1, 2)  # (B, K-1, C)
    return reference(
        call["module"], call["hidden"], call["pos"], activation=activation, context=context, h0=call.get("h0")
    )


def check_record(record, call, activation="gelu_pytorch_tanh"):
    """Every read of one record against the independent reference of the same call."""
    fr = frozen_of(call, activation)
    view = record.attention
    y_real = call["y"].transpose(1, 2)
    errors = {
        "reference": rel_err(fr.y.transpose(1, 2), y_real),  # the reference reproduces the model
        "dense": rel_err(view.dense(), impulse_matrix(fr)),
        "values": rel_err(view.values, fr.x.transpose(1, 2)),
        "bias": rel_err(view.bias, bias_reference(fr)),
        "output": rel_err(view.output(), y_real),
        "output_error": record.output_error(),
    }
    for name, err in errors.items():
        assert err < TOL, (record.name, name, err)
    return fr, view


def test_dense_bias_output_match_impulse_response_every_layer(device):
    model = griffin(device)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), capture_blocks(model) as calls, ih.record(model) as rec:
        model(ids, position_ids=pos)
    records = rglru(rec)
    assert [r.name for r in records] == [f"model.layers.{i}.temporal_block" for i in (0, 1, 3)]
    assert len(calls) == 3
    for record, call in zip(records, calls):
        assert record.kind == "rglru" and record.status == "complete"
        fr, view = check_record(record, call)
        assert view.shape == (3, C, L, L)
        A = view.dense()
        assert torch.all(A.triu(1) == 0)  # causal
        # a reset cuts the recurrence: only the conv window (3 taps back) crosses it
        R = view.only("ssm").dense()
        assert torch.all(R[1, :, 6:, :6] == 0) and torch.all(R[2, :, 3:, :3] == 0)
        assert torch.all(A[1, :, 6:, :3] == 0)
        assert A[1, :, 6:, 3:6].abs().sum() > 0  # …through the conv, what precedes a reset still leaks in


@pytest.mark.parametrize("use_cache", [True, False])
def test_cache_paths_of_a_fresh_forward(device, use_cache):
    """use_cache=False sets the module states to None; True (default) resets them to zeros first."""
    model = griffin(device, layers=3)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), capture_blocks(model) as calls, ih.record(model) as rec:
        model(ids, position_ids=pos, use_cache=use_cache)
    for record, call in zip(rglru(rec), calls):
        check_record(record, call)
        offset = record.attention.factors.state_offset
        assert ("initial_state" in record.raw) == use_cache
        assert offset is None or torch.all(offset == 0)  # a fresh forward starts from zero states


def test_ablations_match_frozen_recurrence_with_factors_left_out(device):
    model = griffin(device)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), capture_blocks(model) as calls, ih.record(model) as rec:
        model(ids, position_ids=pos)
    record, call = rglru(rec)[1], calls[1]
    fr = frozen_of(call)
    view = record.attention
    assert view.components == ("gate", "ssm", "conv")
    cases = {
        "only_ssm": (view.only("ssm"), dict(conv=False, gate=False)),
        "no_conv": (view.without("conv"), dict(conv=False)),
        "no_gate": (view.without("gate"), dict(gate=False)),
        "gate_ssm": (view.only("gate", "ssm"), dict(conv=False)),
        "ssm_conv": (view.only("ssm", "conv"), dict(gate=False)),
    }
    for name, (ablated, parts) in cases.items():
        assert rel_err(ablated.dense(), impulse_matrix(fr, **parts)) < TOL, name
        assert rel_err(ablated.bias, bias_reference(fr, **parts)) < TOL, name
    with pytest.raises(ValueError, match="components are"):
        view.without("act")


def test_rows_blocks_and_channel_reductions_equal_the_dense_matrix(device):
    model = griffin(device)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), ih.record(model) as rec:
        model(ids, position_ids=pos)
    view = rglru(rec)[2].attention
    A = view.dense()
    small = view.with_tiles(300)  # forces many channel and row tiles
    heads = torch.arange(C) // WIDTH
    torch.testing.assert_close(view.groups["heads"].cpu(), heads)
    for v in (view, small):
        torch.testing.assert_close(v[0, :, -1], A[0, :, -1])
        torch.testing.assert_close(v[1, 5], A[1, 5])
        torch.testing.assert_close(v[:, 3:9, 4:11, 2:7], A[:, 3:9, 4:11, 2:7])
        rows, cols = torch.tensor([12, 0, 6]), [1, 11, 5, 5]
        torch.testing.assert_close(v[2, [0, 17], rows, cols], A[2][[0, 17]][:, rows][:, :, cols])
        torch.testing.assert_close(v.mean(), A.mean(1))
        torch.testing.assert_close(v.sum(absolute=True), A.abs().sum(1))
        torch.testing.assert_close(v.mean(absolute=True, rows=[-1]), A.abs().mean(1)[:, [-1]])
        by_head = torch.stack([A[:, heads == h].mean(1) for h in range(2)], 1)
        torch.testing.assert_close(v.mean(by="heads"), by_head)
        x = torch.randn(3, C, L, device=device)
        torch.testing.assert_close(v.apply(x), torch.einsum("bctj,bcj->bct", A, x))


@pytest.mark.parametrize("chunk", [3, 4])
def test_matvec_carries_the_state_across_chunks_and_resets(device, monkeypatch, chunk):
    """``apply`` runs the recurrence chunk by chunk: chunks of 3 start exactly at the resets (positions 6
    and 3 of rows 1 and 2), chunks of 4 cut across them; both equal the dense matrix times ``x``, and the
    block's output (``output_error``) holds."""
    monkeypatch.setattr(RGLRUCore, "chunk", chunk)
    model = griffin(device, layers=3)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), ih.record(model) as rec:
        model(ids, position_ids=pos)
    for r in rglru(rec):
        A = r.attention.dense()
        x = torch.randn(3, C, L, device=device)
        x[:, :, 5] = 0  # zeros are ordinary values here
        torch.testing.assert_close(r.attention.apply(x), torch.einsum("bctj,bcj->bct", A, x))
        assert r.output_error() < 1e-5


def test_decode_and_continuation_put_the_module_state_into_bias(device):
    """Prefill, a multi-token continuation (conv restarts from zero, the recurrence from the module state,
    as the model does) and a decode step (conv state and recurrent state), all with an explicit cache."""
    model = griffin(device, layers=3)
    ids = torch.randint(0, 64, (2, 11), device=device)
    kw = cache_kwarg(model)
    with torch.no_grad():
        model(ids)  # leaves stale states in the module attributes
        cache = DynamicCache(config=model.config)
        with capture_blocks(model) as calls, ih.record(model) as rec:
            model(ids[:, :6], **{kw: cache}, use_cache=True)  # starts from the stale states: reset at 0
            model(ids[:, 6:10], **{kw: cache}, use_cache=True)  # continuation
            model(ids[:, 10:11], **{kw: cache}, use_cache=True)  # decode
    records = rglru(rec)
    assert len(records) == len(calls) == 6
    for record, call in zip(records, calls):
        check_record(record, call)
    prefill, cont, step = records[0:2], records[2:4], records[4:6]
    assert all("initial_state" in r.raw for r in records)  # the module had states every time…
    for r in prefill:  # …but the reset at position 0 cuts the stale one off
        assert torch.all(r.attention.factors.state_offset == 0)
    for r in [*cont, *step]:  # the carried state reaches the output, through bias
        assert r.attention.factors.state_offset.abs().sum() > 0
    assert "conv_context" not in cont[0].raw and "conv_context" in step[0].raw
    assert step[0].attention.shape == (2, C, 1, 1)


def test_reset_inside_a_continuation(device):
    model = griffin(device, layers=3)
    ids = torch.randint(0, 64, (2, 12), device=device)
    kw = cache_kwarg(model)
    pos = torch.tensor([[5, 6, 7, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11]], device=device)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :5], **{kw: cache}, use_cache=True)
        with capture_blocks(model) as calls, ih.record(model) as rec:
            model(ids[:, 5:], **{kw: cache}, position_ids=pos, use_cache=True)
    for record, call in zip(rglru(rec), calls):
        check_record(record, call)
        offset = record.attention.factors.state_offset
        assert torch.all(offset[0, :, 3:] == 0) and offset[0, :, :3].abs().sum() > 0
        assert torch.all(offset[1] != 0)


def test_logits_bit_identical_and_no_hook_left(device):
    model = griffin(device)
    ids, pos = batch_with_resets(device)
    with torch.no_grad():
        before = model(ids, position_ids=pos).logits
        with ih.record(model) as rec:
            during = model(ids, position_ids=pos).logits
        after = model(ids, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        kw = cache_kwarg(model)
        plain = [model(ids[:, :8], **{kw: cache}).logits, model(ids[:, 8:9], **{kw: cache}).logits]
        cache = DynamicCache(config=model.config)
        with ih.record(model):
            recorded = [model(ids[:, :8], **{kw: cache}).logits, model(ids[:, 8:9], **{kw: cache}).logits]
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert rglru(rec)[0].attention.dense().shape == (3, C, L, L)


def test_exact_gelu_variant_is_the_models_own(device):
    """The gate uses the model's act_fn: an exact-GeLU config is explained with exact GeLU."""
    model = griffin(device, layers=3, activation="gelu")
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), capture_blocks(model) as calls, ih.record(model) as rec:
        model(ids, position_ids=pos)
    check_record(rglru(rec)[0], calls[0], activation="gelu")  # asserts every read against the reference
    assert rglru(rec)[0].output_error() < TOL


def test_tensors_mapping(device):
    model = griffin(device, layers=3)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), capture_blocks(model) as calls, ih.record(model) as rec:
        model(ids, position_ids=pos)
    t = rglru(rec)[0].tensors
    fr = frozen_of(calls[0])
    expected = {
        "values": fr.x,
        "gate": fr.gate,
        "conv_output": fr.u,
        "input_gate": fr.input_gate,
        "recurrence_gate": fr.recurrence_gate,
        "decay": fr.a,
        "normaliser": fr.norm,
        "input_proj": fr.input_gate * fr.norm,
    }
    for key, ref in expected.items():
        assert t[key].shape == (3, C, L), key
        assert rel_err(t[key], ref.transpose(1, 2)) < TOL, key
    assert torch.equal(t["reset"].cpu(), pos.cpu() == 0)
    assert torch.isneginf(t["log_decay"][1, :, 6]).all()
    torch.testing.assert_close(t["log_decay"].exp(), t["decay"])


def test_float64_views_on_request(device):
    model = griffin(device, layers=3)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), capture_blocks(model) as calls, ih.record(model) as rec:
        model(ids, position_ids=pos)
    view = rglru(rec)[0].view(torch.float64)
    assert view.dtype == torch.float64
    assert rel_err(view.dense(), impulse_matrix(frozen_of(calls[0]))) < TOL
    assert rglru(rec)[0].output_error(torch.float64) < TOL


def test_bfloat16_model():
    """bf16 models are explained in float32 from their bf16 recordings: documented tolerance 3e-2."""
    model = griffin("cpu", dtype=torch.bfloat16)
    ids, pos = batch_with_resets("cpu")
    with torch.no_grad():
        ref = model(ids, position_ids=pos).logits
        with ih.record(model) as rec:
            out = model(ids, position_ids=pos).logits
    assert torch.equal(ref, out)
    for r in rglru(rec):
        assert r.attention.dtype == torch.float32
        assert r.output_error() < 3e-2


def test_gradients_flow_through_views_when_recorded_with_grad(device):
    model = griffin(device, layers=3)
    embeds = model.model.embed_tokens(torch.randint(0, 64, (1, 7), device=device)).detach().requires_grad_()
    with ih.record(model, grad=True) as rec:
        model(inputs_embeds=embeds)
    score = rglru(rec)[1].attention[0, :, -1].sum()
    (grad,) = torch.autograd.grad(score, embeds, retain_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    (grad,) = torch.autograd.grad(rglru(rec)[1].attention.output().sum(), embeds)  # through the matvec
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_weights_changed_after_recording_are_refused(device):
    model = griffin(device, layers=3)
    ids, pos = batch_with_resets(device)
    with torch.no_grad(), ih.record(model) as rec:
        model(ids, position_ids=pos)
    with torch.no_grad():
        model.model.layers[0].temporal_block.rg_lru.recurrent_param.add_(0.1)
    with pytest.raises(ih.RecordingError, match="changed in place"):
        rglru(rec)[0].attention.dense()


def test_reads_only_compute_what_they_return(device):
    """A last-token row asks the core for one row; a channel mean never for more than a tile."""
    model = griffin(device, layers=3)
    with torch.no_grad(), ih.record(model) as rec:
        model(torch.randint(0, 64, (1, 40), device=device))
    view = rglru(rec)[0].attention.with_tiles(8000)
    assert reads_are_bounded(view)
    assert rows_read_nothing_back(view)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_recording_adds_no_host_synchronisation_on_cuda():
    model = griffin("cuda")
    ids, pos = batch_with_resets("cuda")
    kw = cache_kwarg(model)

    def run():
        cache = DynamicCache(config=model.config)
        model(ids[:, :8], position_ids=pos[:, :8], **{kw: cache})
        model(ids[:, 8:9], position_ids=pos[:, 8:9], **{kw: cache})

    def recorded():
        with ih.record(model):
            run()

    with torch.no_grad():
        run()  # warm-up
        assert cuda_syncs(recorded) == cuda_syncs(run)
