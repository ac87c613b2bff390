"""nnsight integration: real nnsight traces (NNsight and TransformersModel, local and remote="local"),
both routes (torch hooks; values saved through nnsight), against `implicit_hooks.record` on the same input
and against the independent float64 per-step reference of the Mamba mixer."""

import contextlib
import inspect
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import cache_kwarg, output_cache, randomize, rel_err
from mamba_reference import bias_reference, impulse_matrix, reference
from transformers import (
    DynamicCache,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
    RecurrentGemmaConfig,
    RecurrentGemmaForCausalLM,
)

import implicit_hooks as ih

nnsight = pytest.importorskip("nnsight")
ihn = pytest.importorskip("implicit_hooks.integrations.nnsight")

TOL = 1e-5  # float32 against the float64 reference, relative (Frobenius)
SAME = 1e-6  # the same views computed from another batch layout (per-invoke rows)
L = 13  # deliberately not a multiple of anything
WORDS = ["<pad>", "<unk>"] + [f"w{i}" for i in range(62)]


def mamba(device, layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=64,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=layers,
        intermediate_size=24,
        conv_kernel=4,
        time_step_rank=3,
        use_conv_bias=True,
        pad_token_id=0,
    )
    return randomize(MambaForCausalLM(cfg), seed).to(device).eval()


def griffin(device, seed=0):
    """Recurrent, recurrent, attention: module-attribute states and two block kinds."""
    torch.manual_seed(seed)
    cfg = RecurrentGemmaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        lru_width=24,
        attention_window_size=8,
        conv1d_width=4,
        block_types=("recurrent", "recurrent", "attention"),
    )
    return randomize(RecurrentGemmaForCausalLM(cfg), seed).to(device).eval()


def tokenizer():
    """A word-level tokenizer built locally (w0 … w61), padding on the left as nnsight sets it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def transformers_model(model, tok, device):
    """`nnsight.TransformersModel` around a model built here. It builds a transformers pipeline, which moves
    the module to the GPU when there is one: put it back where the test wants it."""
    wrapped = nnsight.TransformersModel(model, tokenizer=tok)
    model.to(device)
    return wrapped


def padded_batch(device):
    """Batch of 3: left padding in row 0, right padding in row 1, none in row 2."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 64, (3, L), generator=gen)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids.to(device), mask.to(device)


def assert_same_views(rec, expected, *, exact=True):
    """Every record of `rec` reads like the one `implicit_hooks.record` gave for the same call."""
    assert [r.name for r in rec] == [r.name for r in expected]
    assert [r.kind for r in rec] == [r.kind for r in expected]
    for ours, theirs in zip(rec, expected):
        assert ours.status == "complete"
        a, b = ours.attention, theirs.attention
        for read in (lambda v: v.dense(), lambda v: v.output(), lambda v: v.bias, lambda v: v.values):
            if exact:
                assert torch.equal(read(a), read(b)), ours.name
            else:
                assert rel_err(read(a), read(b)) <= SAME, ours.name
        if theirs.real_output is not None:
            assert torch.equal(ours.real_output, theirs.real_output)
            assert ours.output_error() < TOL


@contextlib.contextmanager
def mixer_inputs(model):
    """Our own hooks, independent of implicit_hooks: each Mamba mixer's input and attention mask."""
    calls, handles = [], []

    def pre(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append((mod, hidden.detach().cpu(), kwargs.get("attention_mask")))

    for mod in model.modules():
        if type(mod).__name__ == "MambaMixer":
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


class Twice(torch.nn.Module):
    """One block applied twice (as a block shared by several layers is)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden):
        return self.block(self.block(hidden))


def record_plain(model, *args, **kwargs):
    with torch.no_grad(), ih.record(model) as rec:
        out = model(*args, **kwargs)
    return rec, out


# --- route 1: torch hooks ---------------------------------------------------------------------------
def test_hooks_route_inside_a_trace_equals_record(device):
    model = mamba(device)
    ids, mask = padded_batch(device)
    expected, out = record_plain(model, ids, attention_mask=mask)
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(ids, attention_mask=mask) as tracer:
        rec = ihn.hooks(tracer)
        logits = wrapped.output.logits.save()
    assert torch.equal(logits, out.logits)  # recording changes nothing
    assert len(rec) == 3
    assert_same_views(rec, expected)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # all removed
    # a later plain forward records nothing more
    with torch.no_grad():
        model(ids)
    assert len(rec) == 3


def test_plain_record_context_inside_a_trace_body_sees_nothing_and_ihn_record_around_it_does(device):
    """The trace body runs before the model does: a `with ih.record` that closes in the body records no
    call. That is why `ihn.hooks(tracer)` keeps its hooks until the forward returns."""
    model = mamba(device, layers=2)
    ids, mask = padded_batch(device)
    expected, _ = record_plain(model, ids, attention_mask=mask)
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(ids, attention_mask=mask):
        with ih.record(model) as inner:
            pass
        inner = nnsight.save(inner)
    assert len(inner) == 0
    with torch.no_grad(), ihn.record(wrapped) as around:
        with wrapped.trace(ids, attention_mask=mask):
            pass
    assert_same_views(around, expected)


def test_hooks_called_after_a_read_is_refused(device):
    model = mamba(device, layers=2)
    ids, _ = padded_batch(device)
    wrapped = nnsight.NNsight(model)
    with pytest.raises(ih.RecordingError, match="before any other read"):
        with torch.no_grad(), wrapped.trace(ids) as tracer:
            wrapped.backbone.layers[1].mixer.in_proj.output.save()
            ihn.hooks(tracer)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # a body that raises after attaching: the model never runs; the hooks go at the next forward, unused
    with pytest.raises(KeyError), torch.no_grad(), wrapped.trace(ids) as tracer:
        ihn.hooks(tracer)
        raise KeyError("the user's own error")
    with torch.no_grad():
        model(ids)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_generation_with_hooks_around_it_and_the_saves_route_inside(device):
    model = mamba(device, layers=2)
    lm = transformers_model(model, tokenizer(), device)
    prompt = "w3 w9 w4 w12 w7"
    with torch.no_grad(), ihn.record(lm) as rec:
        with lm.generate(prompt, max_new_tokens=3, do_sample=False):
            pass
    calls = rec.calls("backbone.layers.0.mixer")
    assert [c.attention.shape[-1] for c in calls] == [5, 1, 1]
    assert all(c.output_error() < TOL for c in rec)  # decode steps continue from the cache, exactly
    with pytest.raises(ih.UnsupportedInputError, match="ihn.record"):
        with torch.no_grad(), lm.generate(prompt, max_new_tokens=2) as tracer:
            ihn.hooks(tracer)
    # the saves route records the first forward of the generation: the prompt
    with torch.no_grad(), lm.generate(prompt, max_new_tokens=3, do_sample=False) as tracer:
        saved = ihn.save(tracer)
    prefill = [r for r in rec if r.attention.shape[-1] == 5]
    assert_same_views(saved.recording(), prefill)


# --- route 2: values saved through nnsight ----------------------------------------------------------
def test_saves_route_equals_record_and_the_float64_reference(device):
    model = mamba(device)
    ids, mask = padded_batch(device)
    expected, out = record_plain(model, ids, attention_mask=mask)
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), mixer_inputs(model) as calls, wrapped.trace(ids, attention_mask=mask) as tracer:
        saved = ihn.save(tracer, scan=True)
        logits = wrapped.output.logits.save()
    assert torch.equal(logits, out.logits)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    rec = saved.recording()
    assert isinstance(rec, ih.Recording) and len(rec) == 3
    assert_same_views(rec, expected)
    for record, (mixer, hidden, call_mask) in zip(rec, calls):
        fr = reference(mixer, hidden, call_mask.cpu())
        view = record.attention
        assert rel_err(view.dense(), impulse_matrix(fr)) < TOL
        assert rel_err(view.bias, bias_reference(fr)) < TOL
        assert rel_err(view.output(), fr.y.transpose(1, 2)) < TOL
        A = view.dense()
        torch.testing.assert_close(view[1, 3:9, 4:11, 2:7], A[1, 3:9, 4:11, 2:7])
        torch.testing.assert_close(view[:, :, -1], A[:, :, -1])
        torch.testing.assert_close(view.mean(), A.mean(1))
        assert (
            rel_err(
                view.only("ssm").dense(), impulse_matrix(fr, conv=False, act=False, skip=False, gate=False)
            )
            < TOL
        )
        assert rel_err(view.without("conv").dense(), impulse_matrix(fr, conv=False)) < TOL
        assert torch.all(A[0, :, :, :3] == 0) and torch.all(A[1, :, :, -2:] == 0)  # padded keys carry nothing


def test_scan_call_inputs_saved_through_source_agree_with_the_derived_tensors(device):
    """`block.source.mamba_selective_scan_0.inputs`: the model's own Δ, B, C and gate for the call."""
    model = mamba(device, layers=2)
    ids, mask = padded_batch(device)
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(ids, attention_mask=mask) as tracer:
        saved = ihn.save(tracer, scan=True)
    for record in saved.recording():
        scan = record.raw["scan"]
        assert scan["op"] == "mamba_selective_scan_0"
        u, dt, A, B, C = scan["args"]
        t = record.tensors
        delta = torch.nn.functional.softplus(dt + scan["kwargs"]["delta_bias"][:, None])
        assert rel_err(delta, t["delta"]) < SAME
        assert rel_err(A, t["A"]) < SAME
        assert rel_err(B.transpose(1, 2), t["B"]) < SAME and rel_err(C.transpose(1, 2), t["C"]) < SAME
        assert rel_err(torch.nn.functional.silu(scan["kwargs"]["z"]), t["gate"]) < SAME
        assert rel_err(u, t["conv_preact"] * t["act"] * t["mask"][:, None, :]) < SAME


def test_remote_emulation_with_invokes_saved_weights_and_a_pickled_return(device):
    """nnsight's local emulation of remote execution: the trace body (and implicit_hooks with it) is
    serialised and run with local modules hidden; client-side hooks do not exist there."""
    model = mamba(device)
    tok = tokenizer()
    lm = transformers_model(model, tok, device)
    prompts = ["w5 w9 w2 w33 w7 w8 w40 w41 w42 w3 w4 w5 w6", "w17 w18 w60 w2"]
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    assert enc["attention_mask"][1, 0] == 0  # left padding in the batch
    expected, out = record_plain(model, **enc)
    with torch.no_grad(), lm.trace(remote="local") as tracer:
        with tracer.invoke(prompts[0]):
            first = lm.output.logits.save()
        with tracer.invoke(prompts[1]):
            second = lm.output.logits.save()
        with tracer.invoke():  # an empty invoke sees the whole batch
            saved = ihn.save(tracer, weights="saved", scan=True)
    assert torch.equal(torch.cat([first, second]), out.logits)
    back = pickle.loads(pickle.dumps(saved))  # what a remote run sends back: plain data, no model
    with pytest.raises(ih.RecordingError, match="recording\\(model\\)"):
        back.recording()
    rec = back.recording(lm)
    assert_same_views(rec, expected)
    assert all(r.weights["A_log"] is not model.backbone.layers[0].mixer.A_log for r in rec)  # copies
    # hooks cannot run there, and say so
    with pytest.raises(ih.UnsupportedInputError, match="ihn.save"):
        with torch.no_grad(), lm.trace(prompts[0], remote="local") as tracer:
            ihn.hooks(tracer)


class ServerWithoutImplicitHooks:
    """nnsight's local emulation of remote execution, stricter: implicit_hooks cannot be imported while the
    trace body runs either, as on a server where it is not installed."""

    def __init__(self, model):
        from nnsight.intervention.backends.local import LocalSimulationBackend

        self.emulation = LocalSimulationBackend(model)

    def __call__(self, tracer):
        import importlib.abc

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "implicit_hooks":
                    raise ModuleNotFoundError(f"No module named {name!r} on this server")

        hidden = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] == "implicit_hooks"}
        finder = NotInstalled()
        sys.meta_path.insert(0, finder)
        try:
            self.emulation(tracer)
        finally:
            sys.meta_path.remove(finder)
            sys.modules.update(hidden)


def test_a_server_without_implicit_hooks_installed_runs_the_saves_route(device):
    model = mamba(device, layers=2)
    lm = transformers_model(model, tokenizer(), device)
    prompt = "w3 w9 w4 w12 w7 w8 w9 w10 w11 w12 w13 w14 w15"
    expected, _ = record_plain(model, **lm.tokenizer([prompt], return_tensors="pt").to(device))
    with torch.no_grad(), lm.trace(prompt, backend=ServerWithoutImplicitHooks(lm)) as tracer:
        saved = ihn.save(tracer, weights="saved", scan=True)
    rec = pickle.loads(pickle.dumps(saved)).recording(lm)
    assert type(rec) is ih.Recording and all(type(r) is ih.BlockRecord for r in rec)
    assert_same_views(rec, expected)


def test_each_invoke_records_its_own_rows(device):
    model = mamba(device)
    tok = tokenizer()
    lm = transformers_model(model, tok, device)
    prompts = ["w5 w9 w2 w33 w7 w8 w40 w41 w42 w3 w4 w5 w6", "w17 w18 w60 w2", "w1 w2 w3 w4 w5 w6 w7"]
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    expected, _ = record_plain(model, **enc)
    with torch.no_grad(), lm.trace(remote="local") as tracer:
        with tracer.invoke(prompts[:2]):
            first = ihn.save(tracer)
        with tracer.invoke(prompts[2]):
            last = ihn.save(tracer, layers=[0, -1])
    rows = {"first": first.recording(), "last": last.recording()}
    assert [r.attention.shape[0] for r in rows["first"]] == [2, 2, 2]
    assert [r.name for r in rows["last"]] == ["backbone.layers.0.mixer", "backbone.layers.2.mixer"]
    for ours, theirs in zip(rows["first"], expected):
        for read in ("dense", "output"):
            assert rel_err(getattr(ours.attention, read)(), getattr(theirs.attention, read)()[:2]) <= SAME
        assert rel_err(ours.attention.bias, theirs.attention.bias[:2]) <= SAME
    for ours, theirs in zip(rows["last"], [expected[0], expected[2]]):
        assert rel_err(ours.attention.dense(), theirs.attention.dense()[2:]) <= SAME
        assert ours.output_error() < TOL


def test_a_call_that_continues_from_a_cache_is_read_when_it_happens(device):
    """A decode step reads the conv and SSM states of the cache; the forward then overwrites them. The
    saves route runs the patcher's `on_call` the moment the block is called, so it copies the states the
    call started from, and the views equal those of `implicit_hooks.record` on the same step."""
    model = mamba(device)
    ids, _ = padded_batch(device)
    kw = cache_kwarg(model)

    def prefill():
        with torch.no_grad():
            return output_cache(model(ids[:, :-1], use_cache=True))

    expected, out = record_plain(model, ids[:, -1:], **{kw: prefill()}, use_cache=True)
    assert all("initial_state" in r.raw and "conv_context" in r.raw for r in expected)
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(ids[:, -1:], **{kw: prefill()}, use_cache=True) as tracer:
        saved = ihn.save(tracer, scan=True)
        logits = wrapped.output.logits.save()
    assert torch.equal(logits, out.logits)
    rec = saved.recording()
    assert all(r.raw["scan"]["op"] == "mamba_selective_state_update_0" for r in rec)
    assert_same_views(rec, expected)
    for r in rec:  # the state reached the output through bias
        assert r.attention.factors.state_offset.abs().sum() > 0


def test_an_invoke_of_some_rows_refuses_a_cache_of_the_whole_batch(device):
    """nnsight narrows a block's arguments to an invoke's rows, not the cache the patcher reads."""
    model = mamba(device, layers=2)
    lm = transformers_model(model, tokenizer(), device)
    ids, _ = padded_batch(device)
    kw = cache_kwarg(model)
    with torch.no_grad():
        cache = output_cache(model(ids[:2, :-1], use_cache=True))
    with pytest.raises(ih.UnsupportedInputError, match="empty tracer.invoke"):
        with torch.no_grad(), lm.trace(**{kw: cache}, use_cache=True) as tracer:
            with tracer.invoke(ids[:1, -1:]):
                ihn.save(tracer)
            with tracer.invoke(ids[1:2, -1:]):
                pass


def test_mamba2_prefill_with_padding_and_a_decode_step_with_their_scan_calls(device):
    """Another family: Mamba-2 (SSD), whose scan is `mamba2_chunk_scan` and whose decode steps go through
    `mamba2_selective_state_update`."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=64,
        hidden_size=16,
        expand=2,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        state_size=4,
        conv_kernel=4,
        chunk_size=5,
        num_hidden_layers=2,
        use_conv_bias=True,
        time_step_limit=(0.05, 0.6),
    )
    model = randomize(Mamba2ForCausalLM(cfg), 0).to(device).eval()
    ids, mask = padded_batch(device)
    expected, _ = record_plain(model, ids, attention_mask=mask)
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(ids, attention_mask=mask) as tracer:
        saved = ihn.save(tracer, scan=True)
    rec = saved.recording()
    assert_same_views(rec, expected)
    for record in rec:
        scan, t = record.raw["scan"], record.tensors
        assert scan["op"] == "mamba2_chunk_scan_0"
        x, dt, _, B, C = scan["args"]
        delta = torch.nn.functional.softplus(dt + scan["kwargs"]["dt_bias"]).clamp(
            *scan["kwargs"]["dt_limit"]
        )
        assert rel_err(delta.transpose(1, 2), t["delta"]) < SAME
        assert rel_err(B, t["B"]) < SAME and rel_err(C, t["C"]) < SAME
        ssm_input = t["conv_preact"] * t["act"] * t["mask"][:, None, :]
        assert rel_err(x.flatten(2).transpose(1, 2), ssm_input) < SAME
    kw = cache_kwarg(model)

    def prefill():
        with torch.no_grad():
            return output_cache(model(ids[:, :-1], use_cache=True))

    expected, _ = record_plain(model, ids[:, -1:], **{kw: prefill()}, use_cache=True)
    with torch.no_grad(), wrapped.trace(ids[:, -1:], **{kw: prefill()}, use_cache=True) as tracer:
        saved = ihn.save(tracer, scan=True)
    rec = saved.recording()
    assert all(r.raw["scan"]["op"] == "mamba2_selective_state_update_0" for r in rec)
    assert_same_views(rec, expected)


def test_module_attribute_states_of_griffin_and_both_block_kinds(device):
    """RecurrentGemma keeps its states as module attributes, calls `linear_y` before `linear_x` (the
    patcher's taps in another order) and mixes RG-LRU with softmax attention."""
    model = griffin(device)
    ids = torch.randint(0, 64, (2, 11), device=device)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.17

    def run(step):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :6], **{kw: cache}, use_cache=True)
            return step(cache)

    def plain(cache):
        with ih.record(model) as rec:
            out = model(ids[:, 6:10], **{kw: cache}, use_cache=True)  # a continuation from the states
        return rec, out

    expected, out = run(plain)
    assert {r.kind for r in expected} == {"rglru", "attention"}
    assert all("initial_state" in r.raw for r in expected if r.kind == "rglru")
    wrapped = nnsight.NNsight(model)

    def traced(cache):
        with wrapped.trace(ids[:, 6:10], **{kw: cache}, use_cache=True) as tracer:
            saved = ihn.save(tracer)
            logits = wrapped.output.logits.save()
        return saved, logits

    saved, logits = run(traced)
    assert torch.equal(logits, out.logits)
    assert_same_views(saved.recording(), expected)


def test_views_are_differentiable_when_saved_with_grad(device):
    model = mamba(device, layers=2)
    ids, mask = padded_batch(device)
    with ih.record(model, grad=True) as expected:
        model(ids, attention_mask=mask)
    expected[1].attention.mean().square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(ids, attention_mask=mask) as tracer:
        saved = ihn.save(tracer, grad=True)
    rec = saved.recording()
    rec[1].attention.mean().square().sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys() and "backbone.layers.1.mixer.A_log" in got
    assert "backbone.layers.0.mixer.in_proj.weight" in got  # through the block input, not only its weights
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_clear_errors(device):
    model = mamba(device, layers=2)
    ids, _ = padded_batch(device)
    wrapped = nnsight.NNsight(model)
    with pytest.raises(ih.RecordingError, match="before any other read"):
        with torch.no_grad(), wrapped.trace(ids) as tracer:
            wrapped.backbone.layers[0].mixer.in_proj.output.save()
            ihn.save(tracer)
    with pytest.raises(ValueError, match="'local' or 'saved'"):
        with torch.no_grad(), wrapped.trace(ids) as tracer:
            ihn.save(tracer, weights="remote")
    with torch.no_grad(), wrapped.trace(ids) as tracer:
        saved = ihn.save(tracer)
    with torch.device("meta"):
        remote_client = MambaForCausalLM(model.config)  # a client whose weights live on the server
    with pytest.raises(ih.RecordingError, match="weights='saved'"):
        saved.recording(remote_client)
    with pytest.raises(TypeError, match="tracer of a running trace"):
        ihn.save(wrapped)
    # a block called twice in one forward: the hooks route keeps both calls, the saves route refuses
    shared = nnsight.NNsight(Twice(model.backbone.layers[0].mixer))
    hidden = torch.randn(2, L, 16, device=device)
    with torch.no_grad(), shared.trace(hidden) as tracer:
        rec = ihn.hooks(tracer)
    assert len(rec.calls("block")) == 2 and all(r.output_error() < TOL for r in rec)
    with torch.no_grad(), shared.trace(hidden) as tracer:
        saved = ihn.save(tracer)
    with pytest.raises(ih.RecordingError, match="called 2 times in 1 forward"):
        saved.recording()
    plain = nnsight.NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ih.UnsupportedModelError, match="no block"):
        with plain.trace(torch.randn(2, 4)) as tracer:
            ihn.save(tracer)


def test_importing_implicit_hooks_does_not_import_nnsight():
    code = (
        "import sys, implicit_hooks, implicit_hooks.integrations; "
        "assert 'nnsight' not in sys.modules, 'nnsight imported'; "
        "import implicit_hooks.integrations.nnsight; assert 'nnsight' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
