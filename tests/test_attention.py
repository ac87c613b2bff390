"""Softmax attention layers of Griffin and the hybrids, recorded as ``kind == "attention"``, against an
independent float64 softmax attention (tests/attention_reference.py) and the layer's real o_proj input."""

import pytest
import torch
import transformers as tf
from attention_reference import capture_attention, reference
from conftest import cache_kwarg, randomize, rel_err
from transformers import DynamicCache, StaticCache
from view_checks import cuda_syncs

import implicit_hooks as ih
from implicit_hooks import registry

TOL = 1e-5  # float32, relative (Frobenius)
L = 13  # deliberately not a multiple of anything
V = 64  # vocabulary
IMPLEMENTATIONS = ["eager", "sdpa"]


def _config(family: str):
    """Tiny configs: grouped-query attention (4 query heads, 2 key/value heads) wherever the model has it."""
    small = dict(vocab_size=V, hidden_size=16)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4, mamba_d_conv=4)
    if family == "recurrent_gemma":  # a window of 5 < L: the sliding window bites; partial RoPE
        return tf.RecurrentGemmaConfig(
            **small, **heads, num_hidden_layers=3, intermediate_size=32, lru_width=16, conv1d_width=3,
            attention_window_size=5, block_types=["recurrent", "attention", "attention"], attention_bias=True,
        )  # fmt: skip
    if family == "jamba":
        return tf.JambaConfig(
            **small, **heads, intermediate_size=32, num_hidden_layers=4, attn_layer_period=2,
            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
            num_experts_per_tok=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=3,
        )  # fmt: skip
    if family == "zamba":  # no RoPE, scale (d / 2)^-1/2, input = [hidden, embeddings]
        return tf.ZambaConfig(
            **small, **heads, intermediate_size=32, num_hidden_layers=5, n_mamba_heads=2, attn_layer_period=2,
            attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=3,
        )  # fmt: skip
    if family == "zamba2":  # shared attention with per-layer LoRA adapters, RoPE
        return tf.Zamba2Config(
            **small, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, n_mamba_heads=2, chunk_size=8,
            intermediate_size=32, num_attention_heads=4, num_key_value_heads=4, num_mem_blocks=1,
            use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True,
        )  # fmt: skip
    if family == "bamba":  # partial RoPE (factor 0.5), biases
        return tf.BambaConfig(
            **small, **heads, **mamba2, intermediate_size=32, num_hidden_layers=3, attn_layer_indices=[1],
            mamba_expand=2, mamba_chunk_size=8, attention_bias=True,
        )  # fmt: skip
    if family == "nemotron_h":  # no RoPE; head_dim 6 is not hidden / heads
        return tf.NemotronHConfig(
            **small, **heads, layers_block_type=["mamba", "attention", "mlp", "attention"], head_dim=6,
            intermediate_size=32, ssm_state_size=4, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
            conv_kernel=4, expand=2, chunk_size=8,
        )  # fmt: skip
    if family == "granite":  # scale = attention_multiplier
        return tf.GraniteMoeHybridConfig(
            **small, **heads, **mamba2, intermediate_size=32, num_hidden_layers=3,
            layer_types=["mamba", "attention", "attention"], mamba_expand=2, mamba_chunk_size=8,
            num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=32, attention_multiplier=0.3,
            position_embedding_type="rope",
        )  # fmt: skip
    if family == "falcon_h1":  # attention and Mamba-2 in parallel in every layer; key_multiplier
        return tf.FalconH1Config(
            **small, **heads, **mamba2, intermediate_size=32, num_hidden_layers=2, mamba_d_ssm=32,
            mamba_expand=2, mamba_chunk_size=8, key_multiplier=0.7, attention_bias=True,
        )  # fmt: skip
    raise KeyError(family)


MODELS = {
    "recurrent_gemma": (tf.RecurrentGemmaForCausalLM, "RecurrentGemmaAttention"),
    "jamba": (tf.JambaForCausalLM, "JambaAttention"),
    "zamba": (tf.ZambaForCausalLM, "ZambaAttention"),
    "zamba2": (tf.Zamba2ForCausalLM, "Zamba2Attention"),
    "bamba": (tf.BambaForCausalLM, "BambaAttention"),
    "nemotron_h": (tf.NemotronHForCausalLM, "NemotronHAttention"),
    "granite": (tf.GraniteMoeHybridForCausalLM, "GraniteMoeHybridAttention"),
    "falcon_h1": (tf.FalconH1ForCausalLM, "FalconH1Attention"),
}
ROPE = {"recurrent_gemma", "zamba2", "bamba", "granite", "falcon_h1"}


def build(family: str, implementation: str, device, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _config(family)
    cfg._attn_implementation = implementation
    model = MODELS[family][0](cfg)
    return randomize(model, seed, scale=0.3).to(device).eval()


def attention_class(model, family: str) -> type:
    name = MODELS[family][1]
    return next(type(m) for m in model.modules() if type(m).__name__ == name)


def window_of(model, family: str) -> int | None:
    return model.config.attention_window_size if family == "recurrent_gemma" else None


def padded_batch(device):
    """Batch of 3: left padding in row 0, right padding in row 1, none in row 2."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (3, L), generator=gen)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids.to(device), mask.to(device)


def attention_layers(model) -> list[str]:
    """Names of the softmax attention modules (recording only these keeps other families out of the test)."""
    return [n for n, m in model.named_modules() if type(m).__name__ in {c for _, c in MODELS.values()}]


def next_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def check(record, ref, implementation, *, call=None):
    """Every read of one attention record against the independent reference of the same call."""
    view = record.attention
    y = record.real_output
    assert rel_err(ref.output, y) < TOL, "the reference itself does not reproduce the model"
    assert rel_err(view.dense(), ref.matrix) < TOL
    assert rel_err(view.bias, ref.bias) < TOL
    assert rel_err(view.output(), y) < TOL
    assert record.output_error() < TOL
    if call is not None and implementation == "eager":  # the module's own weights, returned in eager mode
        weights = call["weights"]
        K = weights.shape[-1]  # a sliding cache returns only the keys inside the window
        assert rel_err(weights, ref.probs[..., -K:]) < TOL and torch.all(ref.probs[..., :-K] == 0)
    return view


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", list(MODELS))
def test_views_equal_an_independent_softmax_for_every_model(device, family, implementation):
    model = build(family, implementation, device)
    ids, mask = padded_batch(device)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        cls = attention_class(model, family)
        with capture_attention(model, cls) as calls, ih.record(model, layers=attention_layers(model)) as rec:
            during = model(ids, attention_mask=mask).logits
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    records = [r for r in rec if r.kind == "attention"]
    assert len(records) == len(calls) >= 1
    for record, call in zip(records, calls):
        assert record.status == "complete"
        ref = reference(
            family, [call], mask, implementation=implementation, window=window_of(model, family),
            use_rope=family in ROPE,
        )  # fmt: skip
        view = check(record, ref, implementation, call=call)
        H, d = ref.probs.shape[1], ref.head_dim
        assert view.shape == (3, H * d, L, L)
        assert view.components == ("ssm",)
        # every real query row of the full softmax sums to 1; padded key columns carry nothing
        full = record.tensors["probs"]
        torch.testing.assert_close(
            full[[1, 2]][:, :, :-2].sum(-1), torch.ones_like(full[[1, 2]][:, :, :-2, 0])
        )
        assert torch.all(view.dense()[0, :, :, :3][:, 3:] == 0) and torch.all(view.dense()[1, :, :, -2:] == 0)


@pytest.mark.parametrize("family", list(MODELS))
def test_whole_model_recording_walks_every_token_mixing_layer_in_order(device, family):
    """Every registered block of the hybrid recorded at once: attention records sit in layer order."""
    model = build(family, "sdpa", device)
    ids, mask = padded_batch(device)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        with ih.record(model) as rec:
            during = model(ids, attention_mask=mask).logits
    assert torch.equal(before, during)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    # the walk skips the blocks' sub-modules (Patcher.holds_blocks): it still finds what a full walk finds
    assert rec.blocks == [name for name, m in model.named_modules() if registry.patcher_class_for(m)]
    layer = [int(name.split("layers.")[1].split(".")[0]) for name in rec.names()]
    assert layer == sorted(layer)  # call order is layer order
    attention = [r.name for r in rec if r.kind == "attention"]
    assert attention == attention_layers(model)
    for record in rec:
        if record.kind == "attention":
            assert record.output_error() < TOL


def test_sliding_window_zeroes_keys_beyond_the_window(device):
    model = build("recurrent_gemma", "sdpa", device)
    ids = torch.randint(0, V, (2, L), device=device)
    with torch.no_grad(), ih.record(model, layers=attention_layers(model)) as rec:
        model(ids)
    A = next(r for r in rec if r.kind == "attention").attention.mean(by="heads")  # (B, H, L, L)
    t, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    outside = ((t - j >= 5) | (j > t)).to(device)
    assert torch.all(A[..., outside] == 0) and torch.all(A[..., ~outside] > 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rows_blocks_and_head_reductions_equal_the_dense_matrix(device, implementation):
    model = build("bamba", implementation, device)
    ids, mask = padded_batch(device)
    cls = attention_class(model, "bamba")
    with (
        torch.no_grad(),
        capture_attention(model, cls) as calls,
        ih.record(model, layers=attention_layers(model)) as rec,
    ):
        model(ids, attention_mask=mask)
    record = next(r for r in rec if r.kind == "attention")
    ref = reference("bamba", calls, mask, implementation=implementation, use_rope=True)
    view = record.attention
    A = view.dense()
    C = A.shape[1]  # 4 heads × 4 channels
    for v in (view, view.with_tiles(60)):  # tiny tiles: many channel and row tiles
        torch.testing.assert_close(v[0, :, -1], A[0, :, -1])
        torch.testing.assert_close(v[1, 5], A[1, 5])
        torch.testing.assert_close(v[:, 3:9, 4:11, 2:7], A[:, 3:9, 4:11, 2:7])
        rows, cols = torch.tensor([12, 0, 5]), [1, 11, 3, 3]
        torch.testing.assert_close(v[2, [0, 7], rows, cols], A[2][[0, 7]][:, rows][:, :, cols])
        torch.testing.assert_close(v.mean(), A.mean(1))
        torch.testing.assert_close(v.sum(absolute=True, rows=[-1]), A.abs().sum(1)[:, [-1]])
        # per-head maps: the head's softmax itself (every channel of a head shares it)
        heads = v.mean(by="heads")
        assert heads.shape == (3, 4, L, L)
        assert rel_err(heads, ref.probs.tril()) < TOL
        kv = v.mean(by="kv_heads")
        torch.testing.assert_close(kv, heads.view(3, 2, 2, L, L).mean(2))
        x = torch.randn(3, C, L, device=device)
        torch.testing.assert_close(v.apply(x), torch.einsum("bctj,bcj->bct", A, x))
    core = view.factors.core
    core.tile_elements = 30  # the core's own row chunks (full-width logits) down to two rows
    torch.testing.assert_close(view[0, :, 4:], A[0, :, 4:])
    outside = core.outside(record.tensors["values_all"])  # eager: padded rows reach every key
    if implementation == "eager":
        torch.testing.assert_close(outside, view.bias)
        assert torch.count_nonzero(outside) > 0
    else:
        assert outside is None and torch.all(view.bias == 0)
    assert torch.equal(view.groups["heads"].cpu(), torch.arange(C) // 4)
    assert rel_err(view.values, ref.values.transpose(2, 3).reshape(3, C, L)) < TOL
    # channels of a head read their key/value head's values: heads 0, 1 share kv head 0
    torch.testing.assert_close(view.values[:, :4], view.values[:, 4:8])
    with pytest.raises(IndexError, match="out of range"):
        view[0, C]


def test_reads_compute_only_the_rows_they_return(device):
    model = build("jamba", "sdpa", device)
    ids = torch.randint(0, V, (1, 40), device=device)
    with torch.no_grad(), ih.record(model, layers=attention_layers(model)) as rec:
        model(ids)
    view = next(r for r in rec if r.kind == "attention").attention
    core = view.factors.core
    asked = []
    original = core.probs

    def spy(b, heads, rows):
        asked.append(len(rows))
        return original(b, heads, rows)

    core.probs = spy
    view[0, :, -1]
    assert asked == [1]  # one query row's logsumexp, not the whole matrix
    asked.clear()
    view.mean(rows=[3, 7])
    assert set(asked) == {2}


def test_ablating_the_softmax_leaves_nothing():
    model = build("falcon_h1", "eager", "cpu")
    ids, mask = padded_batch("cpu")
    with torch.no_grad(), ih.record(model, layers=attention_layers(model)) as rec:
        model(ids, attention_mask=mask)
    view = next(r for r in rec if r.kind == "attention").attention
    assert torch.all(view.without("ssm").dense() == 0) and torch.all(view.without("ssm").bias == 0)
    torch.testing.assert_close(view.only("ssm").dense(), view.dense())
    # left padding: the padded query rows attend to every key (eager spreads them uniformly), later ones too
    assert torch.count_nonzero(view.bias[0, :, :3]) > 0 and torch.all(view.bias[1:] == 0)
    with pytest.raises(ValueError, match="components are"):
        view.without("gate")


CONTINUATION = ["recurrent_gemma", "bamba", "zamba2", "nemotron_h"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", CONTINUATION)
def test_cache_continuation_and_decode_put_cached_keys_into_bias(device, family, implementation):
    """Prefill 6, continue with 4 tokens, decode 1: cached keys contribute exactly through ``bias``."""
    model = build(family, implementation, device)
    ids, mask = padded_batch(device)
    ids, mask = ids[:2], mask[:2].clone()
    mask[1] = 1  # left padding in row 0 only: continuation keeps the cached padding columns
    cls = attention_class(model, family)
    window = window_of(model, family)
    kw = "cache" if cache_kwarg(model) == "cache" else "past_key_values"  # transformers 5.1x
    # RecurrentGemma continues only with an explicit cache; the others return theirs
    cache = DynamicCache(config=model.config) if family == "recurrent_gemma" else None
    recordings, captured = [], []
    with torch.no_grad():
        for lo, hi in [(0, 6), (6, 10), (10, 11)]:
            with (
                capture_attention(model, cls) as calls,
                ih.record(model, layers=attention_layers(model)) as rec,
            ):
                out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], use_cache=True, **{kw: cache})
            cache = cache if family == "recurrent_gemma" else next_cache(out)
            recordings.append([r for r in rec if r.kind == "attention"])
            captured.append(calls)
    for step, (records, calls) in enumerate(zip(recordings, captured)):
        assert len(records) == len(calls) >= 1
        for i, (record, call) in enumerate(zip(records, calls)):
            history = [captured[s][i] for s in range(step + 1)]  # this layer's calls so far
            hi = sum(c["hidden"].shape[1] for c in history)
            ref = reference(
                family, history, mask[:, :hi], implementation=implementation, window=window,
                use_rope=family in ROPE,
            )  # fmt: skip
            check(record, ref, implementation, call=call)
            if step > 0:
                assert record.raw["cache"] is not None and torch.count_nonzero(record.attention.bias) > 0
    assert recordings[2][0].attention.shape[-2:] == (1, 1)


def test_views_refuse_a_cache_changed_since_or_a_static_cache():
    model = build("bamba", "sdpa", "cpu")
    ids = torch.randint(0, V, (2, 9))
    layers = attention_layers(model)
    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True)
        cache = next_cache(out)
        kw = "cache" if cache_kwarg(model) == "cache" else "past_key_values"
        with ih.record(model, layers=layers) as rec:
            model(ids[:, 6:8], use_cache=True, **{kw: cache})
        model(ids[:, 8:9], use_cache=True, **{kw: cache})  # appending keeps the keys it attended to
        assert rec[0].output_error() < TOL
        with ih.record(model, layers=layers) as rec:
            model(ids[:, 6:8], use_cache=True, **{kw: cache})
        cache.reorder_cache(torch.tensor([1, 0]))  # beam search reorders the cache in place
        with pytest.raises(ih.RecordingError, match="cropped, reset or reordered"):
            rec[0].attention.dense()

    model = build("nemotron_h", "eager", "cpu")
    layers = attention_layers(model)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=16)
        with ih.record(model, layers=layers) as prefill:
            model(ids[:, :6], use_cache=True, **{kw: cache})
        with ih.record(model, layers=layers) as step:
            model(ids[:, 6:7], use_cache=True, **{kw: cache})
    with pytest.raises(ih.UnsupportedInputError, match="static"):
        prefill[0].attention.dense()
    with pytest.raises(ih.UnsupportedInputError, match="DynamicCache"):
        step[0].attention.dense()


def test_falcon_h1_layer_records_mamba_then_attention_in_call_order(monkeypatch):
    """A FalconH1 layer calls its Mamba-2 mixer, then its attention, on the same input: two records."""
    mixer = "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer"
    if mixer not in registry.supported_classes():  # until the Mamba-2 family lands: a stand-in patcher

        class MixerStandIn(ih.Patcher):
            kind = "mamba2"

        monkeypatch.setitem(registry._REGISTRY, mixer, MixerStandIn)
    model = build("falcon_h1", "sdpa", "cpu")
    ids, mask = padded_batch("cpu")
    with torch.no_grad(), ih.record(model) as rec:
        model(ids, attention_mask=mask)
    assert rec.names() == [
        "model.layers.0.mamba",
        "model.layers.0.self_attn",
        "model.layers.1.mamba",
        "model.layers.1.self_attn",
    ]
    assert [r.kind for r in rec][1::2] == ["attention", "attention"]
    assert rec["model.layers.1.self_attn"].output_error() < TOL


def test_zamba2_shared_attention_called_at_two_layers(device):
    model = build("zamba2", "eager", device)
    ids, mask = padded_batch(device)
    cls = attention_class(model, "zamba2")
    with (
        torch.no_grad(),
        capture_attention(model, cls) as calls,
        ih.record(model, layers=attention_layers(model)) as rec,
    ):
        model(ids, attention_mask=mask)
    records = [r for r in rec if r.kind == "attention"]
    assert [c["layer_idx"] for c in calls] == [1, 3]
    for record, call in zip(records, calls):  # each call with its own layer's adapters
        assert record.raw["layer_idx"] == call["layer_idx"]
        check(record, reference("zamba2", [call], mask, implementation="eager"), "eager", call=call)


def test_gradients_flow_through_views_when_recorded_with_grad(device):
    model = build("falcon_h1", "sdpa", device)
    ids, mask = padded_batch(device)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    with ih.record(model, layers=attention_layers(model), grad=True) as rec:
        model(inputs_embeds=embeds, attention_mask=mask)
    score = rec[1].attention[2, :, -1].sum() + rec[1].attention.bias.sum()
    (grad,) = torch.autograd.grad(score, embeds)
    assert torch.isfinite(grad).all() and grad[2].abs().sum() > 0


def test_tensors_mapping(device):
    model = build("granite", "sdpa", device)
    ids, mask = padded_batch(device)
    cls = attention_class(model, "granite")
    with (
        torch.no_grad(),
        capture_attention(model, cls) as calls,
        ih.record(model, layers=attention_layers(model)) as rec,
    ):
        model(ids, attention_mask=mask)
    record = next(r for r in rec if r.kind == "attention")
    ref = reference("granite", calls[:1], mask, implementation="sdpa")
    t = record.tensors
    assert set(t) == {"queries", "keys", "values", "values_all", "probs"}
    assert t["queries"].shape == (3, 4, L, 4) and t["keys"].shape == (3, 2, L, 4)
    assert t["values"].shape == (3, 16, L)
    assert rel_err(t["probs"], ref.probs) < TOL
    assert torch.all(t["probs"][0, :, :3] == 0)  # SDPA with a boolean mask: fully masked rows are zero
    view64 = record.view(torch.float64)  # float64 on request
    assert view64.dense().dtype == torch.float64 and rel_err(view64.dense(), ref.matrix) < TOL
    assert record.output_error(torch.float64) < TOL


def test_training_dropout_and_unsupported_implementations_raise_clear_errors():
    model = build("jamba", "eager", "cpu")
    model.config.attention_dropout = 0.5
    for mod in model.modules():
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = 0.5
    ids = torch.randint(0, V, (2, 7))
    model.train()
    with ih.record(model, layers=attention_layers(model)) as rec:
        model(ids)
    record = next(r for r in rec if r.kind == "attention")
    with pytest.raises(ih.UnsupportedInputError, match="dropout"):
        record.attention.dense()
    model.eval()
    with torch.no_grad(), ih.record(model, layers=attention_layers(model)) as rec:
        model(ids)
    record = next(r for r in rec if r.kind == "attention")
    record.raw["implementation"] = "flash_attention_2"  # what a flash model would have recorded
    with pytest.raises(ih.UnsupportedInputError, match="flash_attention_2"):
        record.attention.dense()


def test_bfloat16_model():
    """bf16 models are explained in float32 from their bf16 projections; tolerance 3e-2 (relative)."""
    model = build("bamba", "sdpa", "cpu").to(torch.bfloat16)
    ids, mask = padded_batch("cpu")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with ih.record(model, layers=attention_layers(model)) as rec:
            out = model(ids, attention_mask=mask).logits
    assert torch.equal(ref, out)
    record = next(r for r in rec if r.kind == "attention")
    assert record.attention.dtype == torch.float32 and record.output_error() < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_recording_adds_no_host_synchronisation_on_cuda(implementation):
    model = build("bamba", implementation, "cuda")
    ids, mask = padded_batch("cuda")
    layers = attention_layers(model)

    def recorded():
        with ih.record(model, layers=layers):
            model(ids, attention_mask=mask)

    with torch.no_grad():
        model(ids, attention_mask=mask)  # warm-up
        assert cuda_syncs(recorded) == cuda_syncs(lambda: model(ids, attention_mask=mask))
