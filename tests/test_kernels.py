"""The fused Triton assembly of implicit attention (implicit_hooks/kernels.py: Mamba-1, RG-LRU, Mamba-2,
RWKV-4) against the torch path and against the independent float64 impulse response, at lengths around the
64-wide tiles.

On CUDA the kernels are compiled; elsewhere they run under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), slowly, so the CPU shapes are small.
"""

import copy
import os

import pytest
import torch
from conftest import randomize, rel_err
from mamba_reference import impulse_matrix, reference
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MambaConfig, MambaForCausalLM
from view_checks import cuda_syncs

import implicit_hooks as ih
from implicit_hooks import kernels
from implicit_hooks.view import _parse_index

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")

TOL = 1e-5  # float32 against the float64 reference
SAME = 2e-6  # the kernel against the torch path: both float32, different summation order
SAME_CUDA = 1e-5  # compiled, exp is ex2.approx: ~ulp errors grow with the exponent (tiny, far entries)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"
)
#: tests that launch no kernel on CPU tensors (they compile, or read signatures): run on any machine
ANYWHERE = {
    "test_aligned_launches_only_where_columns_and_strides_allow_16_byte_stores",
    "test_arguments_left_unspecialised_are_arguments_of_each_kernel",
}


@pytest.fixture(autouse=True)
def cpu_kernels_need_the_interpreter(request):
    """CPU tensors reach the kernels only under Triton's interpreter (conftest.py turns it on where there is
    no GPU): on a CUDA machine every test but the CUDA ones (``cuda`` in the name or a ``cuda`` parameter)
    would fail to launch, so they are skipped there; the CUDA tests cover the same code compiled."""
    name = request.node.name
    if "cuda" in name or request.node.originalname in ANYWHERE or os.environ.get("TRITON_INTERPRET") == "1":
        return
    pytest.skip("CPU tensors reach the kernels only under Triton's interpreter (TRITON_INTERPRET=1)")


class Ops(TorchDispatchMode):
    """The names of the torch operations run inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def model(device, *, state=16, conv=4, channels=8, seed=0):
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=64,
        hidden_size=8,
        state_size=state,
        num_hidden_layers=1,
        intermediate_size=channels,
        conv_kernel=conv,
        time_step_rank=2,
    )
    m = randomize(MambaForCausalLM(cfg), seed)
    with torch.no_grad():  # small Δ (≈ 0.01–0.05), so that tiles 64 positions apart hold more than underflow
        mixer = m.backbone.layers[0].mixer
        mixer.dt_proj.weight.mul_(0.05)
        mixer.dt_proj.bias.copy_(
            -4.5 + torch.rand(mixer.dt_proj.bias.shape, generator=torch.Generator().manual_seed(seed)) * 1.5
        )
    return m.to(device).eval()


def record(m, L, device, *, batch=2, pad=True):
    gen = torch.Generator().manual_seed(L)
    ids = torch.randint(0, 64, (batch, L), generator=gen).to(device)
    mask = torch.ones(batch, L, dtype=torch.long, device=device)
    if pad and L > 3:
        mask[0, :3] = 0  # left padding in row 0
    calls = []
    mixer = m.backbone.layers[0].mixer
    hook = mixer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args[0].detach(), kwargs.get("attention_mask"))),
        with_kwargs=True,
    )
    try:
        with torch.no_grad(), ih.record(m) as rec:
            m(ids, attention_mask=mask)
    finally:
        hook.remove()
    return rec[0], calls[0], mixer


def block_inputs(block):
    """Our own pre-hook, independent of implicit_hooks: the block's positional and keyword inputs."""
    calls = []
    handle = block.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    return calls, handle


def both(view):
    return view.with_backend("triton"), view.with_backend("torch")


LENGTHS_CPU = [1, 5, 64, 65, 150]
TUNING_ITEMS = kernels.TUNING["reduce_items"]  # as shipped: sums of few tiles in groups of one channel


@pytest.mark.parametrize("L", LENGTHS_CPU)
def test_dense_matches_the_torch_path_and_the_impulse_response(L):
    rec, (hidden, mask), mixer = record(model("cpu"), L, "cpu")
    fused, plain = both(rec.attention)
    A = fused.dense()
    assert rel_err(A, plain.dense()) < SAME
    fr = reference(mixer, hidden, None if mask is None else mask)
    assert rel_err(A, impulse_matrix(fr)) < TOL
    assert torch.all(A.triu(1) == 0)
    if L > 128:  # far tiles (two tiles apart) matter at these decays
        assert A[:, :, 128:, :64].abs().max() > 1e-3 * A.abs().max()


@pytest.mark.parametrize("state, conv", [(4, 4), (16, 2), (32, 1), (64, 4)])
def test_state_sizes_and_conv_widths(state, conv):
    """N below 16 is zero-padded for the tile product; K = 1 has no conv halo; past 32 states the strips'
    direct blocks loop over the states instead of unrolling them."""
    rec, (hidden, mask), mixer = record(model("cpu", state=state, conv=conv, channels=4), 140, "cpu", batch=1)
    A = rec.attention.with_backend("triton").dense()
    assert rel_err(A, rec.attention.with_backend("torch").dense()) < SAME
    assert rel_err(A, impulse_matrix(reference(mixer, hidden, mask))) < TOL


@pytest.mark.parametrize(
    "parts", [("ssm",), ("gate", "ssm"), ("skip",), ("ssm", "conv"), ("act", "conv", "skip"), ("gate",)]
)
def test_ablations(parts):
    rec, _, _ = record(model("cpu", channels=4), 140, "cpu", batch=1)
    fused, plain = both(rec.attention.only(*parts))
    a, b = fused.dense(), plain.dense()
    assert torch.allclose(a, b, rtol=0, atol=SAME * b.abs().max().clamp_min(1e-30))
    if "ssm" not in parts and "skip" not in parts:
        assert torch.all(a == 0)  # without the core nothing is left


@pytest.mark.parametrize(
    "rows, cols",
    [
        (slice(3, 139), slice(1, 138)),  # ranges that start and end inside tiles
        (slice(-1, None), slice(None)),  # the last token's row
        (slice(64, 130), slice(0, 70)),  # across tile boundaries
        (slice(129, 140), slice(129, 140)),  # one diagonal tile, cut
    ],
)
def test_blocks(rows, cols):
    rec, _, _ = record(model("cpu", channels=4), 140, "cpu")
    fused, plain = both(rec.attention)
    key = (slice(None), slice(1, 3), rows, cols)
    a, b = fused[key], plain[key]
    assert a.shape == b.shape and rel_err(a, b) < SAME


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reads_stored_in_a_narrower_dtype_round_the_float32_entries_once(dtype):
    """The kernels compute in float32 and round as they store: every entry is within one unit in the last
    place of ``dtype`` of the float32 read (to nearest on the GPU; Triton's interpreter truncates), dense
    and in blocks that cut the tiles."""
    rec, _, _ = record(model("cpu", channels=4), 140, "cpu")
    fused = rec.attention.with_backend("triton")
    info = torch.finfo(dtype)

    def rounded(narrow, wide):
        step = info.eps * wide.abs() + info.tiny * info.eps  # one ulp, subnormals included
        return narrow.dtype == dtype and bool(((narrow.float() - wide).abs() <= step).all())

    A = fused.dense()
    assert rounded(fused.dense(dtype), A) and fused.dense(dtype).abs().max() > 0
    key = (1, slice(1, 3), slice(70, 139), slice(5, 131))
    assert rounded(fused.with_output_dtype(dtype)[key], A[key])


@pytest.mark.parametrize("transform, weights", [("signed", True), ("abs", False), ("positive", True)])
def test_channel_reductions(transform, weights):
    """Channel means and sums, each transform (weights go in before it; three cases of the six: each
    costs the interpreter half a minute)."""
    rec, _, _ = record(model("cpu", channels=6), 140, "cpu")
    fused, plain = both(rec.attention)
    shape = rec.attention.values.shape
    gen = torch.Generator().manual_seed(1)
    options = dict(transform=transform)
    if weights:
        options.update(
            row_weight=torch.randn(shape, generator=gen), col_weight=torch.randn(shape, generator=gen)
        )
    for op in ("mean", "sum"):
        assert rel_err(fused.reduce(op, **options), plain.reduce(op, **options)) < SAME
    sub = dict(options, channels=slice(1, None, 2), rows=slice(70, 140), cols=slice(5, 100), batch=1)
    a, b = fused.reduce("mean", **sub), plain.reduce("mean", **sub)
    assert a.shape == (1, 70, 95) and rel_err(a, b) < SAME


@pytest.mark.parametrize(
    "far_dot, split, strips", [(False, False, False), (True, True, True), (True, False, False)]
)
def test_every_code_path_of_the_kernel(monkeypatch, far_dot, split, strips):
    """The alternatives ``kernels.TUNING`` selects (benchmarks/bench_kernel.py times them) agree. (The
    interpreter multiplies TF32 operands in float32: ``split`` checks the split, not TF32 rounding.)"""
    rec, (hidden, mask), mixer = record(model("cpu", channels=3), 140, "cpu")  # batch 2, row 0 padded
    reference_ = rec.attention.with_backend("torch").dense()
    monkeypatch.setitem(kernels.TUNING, "FAR_DOT", far_dot)
    monkeypatch.setitem(kernels.TUNING, "FAR_SPLIT_TF32", split)
    monkeypatch.setitem(kernels.TUNING, "NEAR_STRIPS", strips)
    A = rec.attention.with_backend("triton").dense()
    assert rel_err(A, reference_) < SAME
    assert rel_err(A, impulse_matrix(reference(mixer, hidden, mask))) < TOL  # the float64 recurrence


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_far_tiles_loaded_a_tile_ahead_store_the_same_bits(monkeypatch, device):
    """Dense reads whose far loop issues each tile's loads a tile ahead (``TUNING["far_ahead"]``, by output
    entry size) store exactly what the plain loop stores, in float32 and in bfloat16: four row tiles, so
    that rows see far tiles and tiles past the diagonal, row 0 of the batch padded."""
    rec, _, _ = record(model(device, channels=2), 200, device)
    reads = {}
    for ahead in ((), (2, 4)):
        monkeypatch.setitem(kernels.TUNING, "far_ahead", ahead)
        fused = rec.attention.with_backend("triton")
        reads[ahead] = fused.dense(), fused.dense(torch.bfloat16)
    (plain, plain16), (ahead, ahead16) = reads.values()
    assert torch.equal(plain, ahead) and torch.equal(plain16, ahead16)
    assert plain[..., 128:, :64].abs().amax() > 0  # far tiles were computed, not zeros on both sides


class _Launches:
    """A kernel whose launches are recorded (their keyword arguments: constants and options), then run."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_short_reads_in_16_bits_store_the_same_bits(monkeypatch, device):
    """Dense reads stored in 16 bits of up to ``TUNING["short_tiles"]`` column tiles launch Mamba-1's far
    kernel capped at ``maxnreg["far_short"]`` registers with its first strips unrolled, and store exactly
    what the usual launch stores; float32 reads and reads of more column tiles take the usual launch."""
    rec, _, _ = record(model(device, channels=2), 200, device)  # 4 tiles: far, near and zero tiles
    fused = rec.attention.with_backend("triton")
    launches = _Launches(kernels._far_kernel)
    monkeypatch.setattr(kernels, "_far_kernel", launches)
    caps = kernels.TUNING["maxnreg"]

    def read(dtype, expected):  # each batch row a launch
        launches.calls.clear()
        A = fused.dense(dtype)
        assert {(c["UNROLL"], c.get("maxnreg")) for c in launches.calls} == {expected}, launches.calls
        return A

    short16, plain32 = read(torch.bfloat16, (2, caps["far_short"])), read(torch.float32, (1, caps["far"]))
    monkeypatch.setitem(kernels.TUNING, "short_tiles", 3)  # fewer column tiles than the read's 4
    plain16 = read(torch.bfloat16, (1, caps["far"]))
    assert torch.equal(short16, plain16) and rel_err(short16.float(), plain32) < 1e-2
    assert plain32[..., 128:, :64].abs().amax() > 0  # far tiles were computed, not zeros on both sides


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_near_prefetch_stores_the_same_bits(monkeypatch, device):
    """Dense reads by strips ask for their strips' lines into the L1 first (``TUNING["NEAR_PREFETCH"]``, a
    hint: the interpreter skips it) and store exactly what reads without it store, in float32 and bfloat16,
    at the tile size and at lengths that cut tiles; channel sums launch no strips there, so no prefetch."""
    rec, _, _ = record(model(device, channels=2), 150, device)
    fused = rec.attention.with_backend("triton")
    launches = _Launches(kernels._far_kernel)
    monkeypatch.setattr(kernels, "_far_kernel", launches)
    reads = []
    for on in (True, False):
        monkeypatch.setitem(kernels.TUNING, "NEAR_PREFETCH", on)
        launches.calls.clear()
        reads.append((fused.dense(), fused.dense(torch.bfloat16), fused[1, :, 70:150, 5:100]))
        assert launches.calls and all(c["PREFETCH"] is on for c in launches.calls), launches.calls
    for ours, theirs in zip(*reads):
        assert torch.equal(ours, theirs)
    launches.calls.clear()
    fused.mean()
    assert all(c["PREFETCH"] is False for c in launches.calls)


if kernels.triton is not None:
    CONST = kernels.tl.constexpr

    @kernels.triton.jit
    def _near_lines_kernel(out_ptr, c, I, L, C_ptr, W_ptr, sloc_ptr, left_ptr, pmask_ptr, TOTAL, N: CONST,
                           NP: CONST, Q: CONST):  # fmt: skip
        k = kernels.tl.arange(0, 128)
        at = kernels._near_line(k, c, I, L, C_ptr, W_ptr, sloc_ptr, left_ptr, pmask_ptr, N, NP, Q)
        kernels.tl.store(out_ptr + k, at, mask=k < TOTAL)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("I", [2, 3])
def test_near_prefetch_asks_for_the_lines_the_strips_load(device, I):
    """The prefetch's list (``_near_line``), decoded back into arrays and entries: every line of ``C``'s rows
    of tile ``I`` (a state at a time), of ``W``, the local sums and the input mask of tiles ``I − 1`` and
    ``I``, of the left factors of tile ``I``, in that order, and nothing outside the arrays: positions past
    the sequence (tile 3 of 200 positions) and states past ``N`` (12 states padded to 16) repeat a line that
    is there."""
    N, NP, Q, L, c, channels = 12, 16, 64, 200, 1, 3
    arrays = {
        "C": torch.zeros(N, L, device=device),
        "W": torch.zeros(channels, N, L, device=device),
        "sloc": torch.zeros(channels, L, device=device),
        "left": torch.zeros(channels, L, device=device),
        "pmask": torch.zeros(L, device=device),
    }
    total = 3 * NP * (Q // 32) + 5 * (Q // 32)
    out = torch.zeros(128, dtype=torch.int64, device=device)
    _near_lines_kernel[(1,)](out, c, I, L, *arrays.values(), total, N=N, NP=NP, Q=Q)

    def where(address):
        for name, a in arrays.items():
            offset = address - a.data_ptr()
            if 0 <= offset < a.numel() * 4:
                assert offset % 4 == 0
                return name, offset // 4
        raise AssertionError(f"address {address:#x} lies in none of the arrays")

    rows = [min(I * Q + r, L - 1) for r in range(0, Q, 32)]
    cols = [min(max(I * Q - Q + r, 0), L - 1) for r in range(0, 2 * Q, 32)]
    expected = (
        [("C", min(n, N - 1) * L + t) for n in range(NP) for t in rows]
        + [("W", (c * N + min(n, N - 1)) * L + j) for n in range(NP) for j in cols]
        + [("sloc", c * L + j) for j in cols]
        + [("pmask", j) for j in cols]
        + [("left", c * L + t) for t in rows]
    )
    assert [where(a) for a in out[:total].tolist()] == expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_eviction_policies_store_the_same_bits(monkeypatch, device):
    """Dense reads with the shipped L2 eviction policies (``TUNING["evict"]``: Mamba-1's far and zero tiles,
    Mamba-2's by-head tiles and the channels' factors they load, RWKV-4's tiles) store exactly what reads
    without them store, in float32 and in bfloat16; each family's dense launch takes its policies, a
    channel sum none. (Triton's interpreter ignores the policies: on CPU this checks the code paths.)"""
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", True)
    launched = []

    def spy(kernel, groups, evict=kernels._evict):
        launched.append((kernel, groups, evict(kernel, groups)))
        return launched[-1][2]

    monkeypatch.setattr(kernels, "_evict", spy)
    views = {
        "far_strips": record(model(device, channels=2), 200, device)[0].attention,
        "head": mamba2_record(140, device, batch=1)[0].attention,
        "wkv": rwkv4_record(140, device).attention,
    }
    shipped = kernels.TUNING["evict"]
    for name, view in views.items():
        assert shipped[name][0] == "evict_first", name  # the tiles stream past the L2
        fused = view.with_backend("triton")
        reads = []
        for policies in (shipped, {}):
            monkeypatch.setitem(kernels.TUNING, "evict", policies)
            launched.clear()
            reads.append((fused.dense(), fused.dense(torch.bfloat16)))
            evicts = [e["EVICT"] for kernel, _, e in launched if kernel == name]
            assert evicts and all(e == (1 if policies else 0) for e in evicts), (name, launched)
        assert torch.equal(reads[0][0], reads[1][0]) and torch.equal(reads[0][1], reads[1][1]), name
        monkeypatch.setitem(kernels.TUNING, "evict", shipped)
        launched.clear()
        fused.mean()
        assert all(e["EVICT"] == 0 for _, groups, e in launched if groups), launched
    assert kernels._evict("head", 0)["LOAD_EVICT"] == kernels.EVICTIONS["evict_last"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("tile", [32, 128])
def test_other_tile_sizes(monkeypatch, device, tile):
    """Every kernel is written for any power-of-two tile (``kernels.TILE``; benchmarks/sweep_dense.py times
    32 and 128): the diagonal tile's strips go in as many widths as the tile has powers of two of strips,
    and half the strips factorised, half direct, all of them direct. Two rows, row 0 left-padded, against
    the torch path and the float64 recurrence fed unit impulses."""
    rec, (hidden, mask), mixer = record(model(device, channels=2), 150, device)
    reference_ = rec.attention.with_backend("torch").dense()
    impulses = impulse_matrix(reference(copy.deepcopy(mixer).cpu(), hidden.cpu(), mask.cpu()))
    monkeypatch.setattr(kernels, "TILE", tile)
    fused = rec.attention.with_backend("triton")
    growth = fused._fused_tiles(1, torch.arange(2, device=device)).growth[..., 0]
    for threshold in (float(growth.median()), 0.0):
        monkeypatch.setattr(kernels, "STRIP_GROWTH", threshold)
        A = fused.dense()
        assert rel_err(A, reference_) < (SAME if device == "cpu" else SAME_CUDA)
        assert rel_err(A.cpu(), impulses) < TOL


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_near_strips_factorised_or_direct(monkeypatch, device):
    """Near tiles by strips: each strip factorises through its start where its column factors grow by at
    most ``e^STRIP_GROWTH``, and channel sums take its every entry directly elsewhere; a threshold at the
    median growth mixes both within a channel and across the channels summed in one program. Dense reads
    go by row tiles: the product takes every column whose factor cannot grow, the ``K − 1`` before a
    strip's diagonal block and the block where they grow little enough, and blocks of ``SQ × SQ`` entries
    computed directly the rest (all but the first of those columns at a threshold of 0); tile ``I − 1`` goes
    to the far kernel's product where row tile ``I``'s first strip is factorised: some of each here."""
    rec, (hidden, mask), mixer = record(model(device, channels=3), 140, device)
    plain, fused = rec.attention.with_backend("torch"), rec.attention.with_backend("triton")
    # the float64 recurrence runs on the CPU
    impulses = impulse_matrix(reference(copy.deepcopy(mixer).cpu(), hidden.cpu(), mask.cpu()))
    reference_ = plain.dense()
    same = SAME if device == "cpu" else SAME_CUDA
    growths = fused._fused_tiles(1, torch.arange(3, device=device)).growth.cpu()  # row 1: no padding
    assert growths.shape == (3, 9, 2) and bool((growths > 0).all())
    growth, block = growths.unbind(-1)  # the strips' growths, their diagonal blocks' (larger)
    # thresholds: half the strips factorised; all of them and half their diagonal blocks (dense); none
    for threshold in (float(growth.median()), float(block.median()), 0.0):
        monkeypatch.setattr(kernels, "STRIP_GROWTH", threshold)
        share = float((growth <= threshold).float().mean())
        whole = float((block <= threshold).float().mean())  # dense: the product takes the diagonal block
        far = int((growth[:, 4::4] <= threshold).sum())  # first strips of row tiles 1 and 2 (of 6)
        if threshold == float(growth.median()):
            assert 0.3 < share < 0.7 and whole == 0.0 and 0 < far < 6
        elif threshold:
            assert share == 1.0 and 0.3 < whole < 0.7 and far == 6
        else:
            assert share == whole == far == 0
        A = fused.dense()
        assert rel_err(A, reference_) < same
        assert rel_err(A.cpu(), impulses) < TOL
        assert rel_err(fused.mean(absolute=True), plain.mean(absolute=True)) < same
        key = (1, slice(None), slice(70, 140), slice(50, 120))
        assert rel_err(fused[key], plain[key]) < same


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_strips_that_grow_up_to_the_bound_are_as_exact_as_direct_entries(monkeypatch, device):
    """A strip's product is as exact as computing its entries one by one, however much its column factors
    grow up to ``e^STRIP_GROWTH``: with steps large enough that strips grow from a few to past the bound
    (``e^2`` to ``e^180``), the entries the default read computes otherwise than a read that takes every
    strip's entries directly (threshold 0) are as close to the float64 recurrence, measured against their
    row's largest; none is infinite or NaN (strips past the sequence too); the bfloat16 reads are at most
    one bfloat16 unit apart, and the channel means agree."""
    m = model(device, channels=4)
    with torch.no_grad():  # steps of about 0.05–0.8: a strip spans 19 of them, with rates up to 16
        mixer = m.backbone.layers[0].mixer
        mixer.dt_proj.bias.copy_(-3.0 + torch.linspace(0.0, 2.8, mixer.dt_proj.bias.numel()))
    rec, (hidden, mask), mixer = record(m, 140, device)
    impulses = impulse_matrix(reference(copy.deepcopy(mixer).cpu(), hidden.cpu(), mask.cpu())).double()
    rows = impulses.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    fused = rec.attention.with_backend("triton")
    growth = fused._fused_tiles(1, torch.arange(4, device=device)).growth.cpu()
    bound = kernels.STRIP_GROWTH
    assert bool((growth <= 8).any() & (growth > bound).any())
    assert float(((growth > 8) & (growth <= bound)).float().mean()) > 0.2  # what the bound above 8 adds

    def reads() -> tuple[torch.Tensor, torch.Tensor]:
        A, A16 = fused.dense().cpu().double(), fused.dense(torch.bfloat16).cpu().double()
        assert bool(A.isfinite().all() & A16.isfinite().all())
        return A, A16

    (shipped, shipped16), mean = reads(), fused.mean()
    monkeypatch.setattr(kernels, "STRIP_GROWTH", 0.0)
    direct, direct16 = reads()
    differ = shipped != direct
    assert float(differ.float().mean()) > 0.05  # the bound decides how a good share of entries is computed
    ours, theirs = (((x - impulses).abs() / rows)[differ] for x in (shipped, direct))
    assert float(ours.max()) <= 2 * float(theirs.max()) + 1e-6, (float(ours.max()), float(theirs.max()))
    assert float(ours.mean()) <= 2 * float(theirs.mean()) + 1e-9, (float(ours.mean()), float(theirs.mean()))
    assert bool(((shipped16 - direct16).abs() <= 2**-7 * direct16.abs()).all())
    assert rel_err(mean, fused.mean()) < (SAME if device == "cpu" else SAME_CUDA)


def test_preparation_is_chunked_over_channels(monkeypatch):
    """The fused path prepares at most ``FUSED_PREP_ELEMENTS`` worth of channels at a time (its only
    temporary memory besides the output), and the result does not depend on the chunking."""
    from implicit_hooks import view as view_module

    rec, _, _ = record(model("cpu", channels=6), 70, "cpu", batch=1)
    fused = rec.attention.with_backend("triton")
    whole, whole_mean = fused.dense(), fused.mean(absolute=True)
    sizes = []
    original = kernels.DiagonalTiles.__init__

    def spy(self, *arrays, **parts):
        sizes.append(arrays[4].shape[0])  # weight: (channels, L)
        original(self, *arrays, **parts)

    monkeypatch.setattr(kernels.DiagonalTiles, "__init__", spy)
    work = rec.attention.factors.core.fused_work
    monkeypatch.setattr(view_module, "FUSED_PREP_ELEMENTS", 2 * work * 70)  # two channels at a time
    assert torch.equal(fused.dense(), whole)
    assert rel_err(fused.mean(absolute=True), whole_mean) < SAME
    assert sizes and max(sizes) == 2 and sum(sizes) == 2 * 6


def rglru_record(L, device):
    """An RG-LRU block (RecurrentGemma) on two rows: one sequence, and packed sequences whose resets
    fall in the first, the second and the third 64-wide tile (near and far tiles cross them)."""
    from test_griffin import griffin

    model = griffin(device, layers=1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # slow decays (a ≈ 1), so that far tiles hold more than underflow
        lru = model.model.layers[0].temporal_block.rg_lru
        lru.recurrent_param.copy_(-5 + 2 * torch.rand(lru.recurrent_param.shape, generator=gen))
    ids = torch.randint(0, 64, (2, L), generator=gen).to(device)
    pos = torch.arange(L).repeat(2, 1)
    for start in (20, 100, 140):
        if start < L:
            pos[1, start:] = torch.arange(L - start)
    block = model.model.layers[0].temporal_block
    calls, handle = block_inputs(block)
    try:
        with torch.no_grad(), ih.record(model) as rec:
            model(ids, position_ids=pos.to(device), use_cache=False)  # one layer: no attention cache
    finally:
        handle.remove()
    args, kwargs = calls[0]
    position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
    return rec[0], lambda: griffin_impulses(block, args[0].cpu(), position_ids.cpu())


def griffin_impulses(block, hidden, position_ids):
    from griffin_reference import impulse_matrix as griffin_impulse_matrix
    from griffin_reference import reference as griffin_reference

    return griffin_impulse_matrix(griffin_reference(block, hidden, position_ids))


def test_rglru_dense_and_reductions_across_resets(monkeypatch):
    rec, impulses = rglru_record(150, "cpu")
    fused, plain = both(rec.attention)
    A = fused.dense()
    assert rel_err(A, plain.dense()) < SAME
    assert rel_err(A, impulses()) < TOL  # the independent float64 recurrence fed unit impulses
    R = fused.only("ssm").dense()
    assert rel_err(R, plain.only("ssm").dense()) < SAME
    assert torch.all(R[1, :, 100:, :100] == 0) and torch.all(R[1, :, 140:, :140] == 0)  # a reset cuts
    assert R[0, :, 128:, :64].abs().max() > 1e-3 * R.abs().max()  # far tiles carry the recurrence
    gen = torch.Generator().manual_seed(0)
    w, v = (torch.randn(rec.attention.values.shape, generator=gen) for _ in range(2))
    for transform in ("signed", "abs"):
        a = fused.mean(transform=transform, row_weight=w, by=None)
        assert rel_err(a, plain.mean(transform=transform, row_weight=w)) < SAME
    # one group of all channels (24): the far tiles' sums as products 16 channels deep, a short block last;
    # the near tiles' sums in one group, and in groups of one channel (partial sums added up after)
    monkeypatch.setitem(kernels.TUNING, "reduce_items", 1)
    monkeypatch.setitem(kernels.TUNING, "rank_one_channels", 16)
    assert rec.attention.values.shape[1] == 24
    for transform, near_items in (("signed", 1), ("abs", 1), ("positive", 10**6)):
        monkeypatch.setitem(kernels.TUNING, "near_reduce_items", near_items)
        a = fused.mean(transform=transform, row_weight=w, col_weight=v)
        assert rel_err(a, plain.mean(transform=transform, row_weight=w, col_weight=v)) < SAME, transform
    # a block that cuts the tiles: the near tiles' partial sums go out masked to it
    block = dict(rows=slice(30, 150), cols=slice(5, 131), transform="abs", row_weight=w)
    assert rel_err(fused.sum(**block), plain.sum(**block)) < SAME


def mamba2_record(L, device, *, groups=1, batch=2, conv=4, head_dim=16):
    """A Mamba-2 block (64 channels, head size 16, N = 16) with small Δ, so that far tiles matter; row 0
    left-padded."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=64, hidden_size=32, expand=2, head_dim=head_dim, num_heads=64 // head_dim, state_size=16,
        n_groups=groups,
        num_hidden_layers=1, chunk_size=32, conv_kernel=conv,
    )  # fmt: skip
    model = randomize(Mamba2ForCausalLM(cfg), 0)
    with torch.no_grad():
        mixer = model.backbone.layers[0].mixer
        mixer.in_proj.weight[-cfg.num_heads :].mul_(0.05)  # the Δ rows
        mixer.dt_bias.fill_(-4.0)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(L)
    ids = torch.randint(0, 64, (batch, L), generator=gen).to(device)
    mask = torch.ones(batch, L, dtype=torch.long, device=device)
    mask[0, :3] = 0
    calls, handle = block_inputs(mixer)
    try:
        with torch.no_grad(), ih.record(model) as rec:
            model(ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    args, kwargs = calls[0]
    hidden, block_mask = args[0].cpu(), kwargs.get("attention_mask")
    block_mask = None if block_mask is None else block_mask.cpu()
    return rec[0], lambda: mamba2_impulses(mixer, hidden, block_mask)


def mamba2_impulses(mixer, hidden, mask):
    from mamba2_reference import impulse_matrix as mamba2_impulse_matrix
    from mamba2_reference import reference as mamba2_reference

    return mamba2_impulse_matrix(mamba2_reference(mixer, hidden, mask))


@pytest.mark.parametrize("by_head", [False, True])
def test_mamba2_scalar_decay_kernel(monkeypatch, by_head):
    """``by_head``: dense blocks and channel sums through ``HeadTiles`` (one core per head, the conv as
    shifted multiply-adds; sums in registers, one program a tile at a time); else the scalar-decay
    ``DiagonalTiles``, channel by channel."""
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", by_head)
    rec, impulses = mamba2_record(140, "cpu", batch=1)  # one row, left-padded (interpreted: slow)
    fused, plain = both(rec.attention)
    A = fused.dense()
    assert rel_err(A, plain.dense()) < SAME
    assert rel_err(A, impulses()) < TOL  # the independent float64 recurrence fed unit impulses
    assert A[:, :, 128:, :64].abs().max() > 1e-3 * A.abs().max()  # far tiles matter
    assert rel_err(fused.mean(absolute=True), plain.mean(absolute=True)) < SAME
    # the by-channel kernels' blocks, sums and parts are Mamba-1's and RG-LRU's (tested there); by head:
    if by_head:
        assert rel_err(fused.only("ssm")[0], plain.only("ssm")[0]) < SAME
        key = (0, slice(10, 30), slice(70, 140), slice(0, 100))
        assert rel_err(fused[key], plain[key]) < SAME
        gen = torch.Generator().manual_seed(5)
        w_rows, w_cols = (torch.randn(rec.attention.values.shape, generator=gen) for _ in range(2))
        for transform in ("signed", "positive"):  # weighted sums of a block that cuts the tiles
            options = dict(transform=transform, row_weight=w_rows, col_weight=w_cols, rows=slice(30, 140))
            options["cols"] = slice(5, 131)
            assert rel_err(fused.sum(**options), plain.sum(**options)) < SAME
        for parts in (("skip",), ("gate", "conv", "skip"), ("ssm", "act"), ("gate",)):
            a, b = fused.only(*parts)[0], plain.only(*parts)[0]
            assert torch.allclose(a, b, rtol=0, atol=SAME * b.abs().max().clamp_min(1e-30)), parts
        # the sums split the heads into groups by the read's tiles: above, four groups of one head (6
        # tiles); here one group (as a read of many tiles launches it) and two groups of two heads
        mean = plain.mean(absolute=True)
        for items, groups in ((1, 1), (8, 2)):
            monkeypatch.setitem(kernels.TUNING, "head_reduce_items", items)
            assert rel_err(fused.mean(absolute=True), mean) < SAME, groups


@pytest.mark.parametrize("by_head", [False, True])
def test_mamba2_channels_of_several_groups(monkeypatch, by_head):
    """Each group of B/C is one kernel call: contiguous channels in place, others through index_copy."""
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", by_head)
    rec, impulses = mamba2_record(70, "cpu", groups=2, batch=1)
    fused, plain = both(rec.attention)
    assert rel_err(fused.dense(), plain.dense()) < SAME
    assert rel_err(fused.dense(), impulses()) < TOL
    mixed = [40, 3, 60, 17, 33]  # channels of both groups (0–31, 32–63), out of order
    assert rel_err(fused[0, mixed, 60:, :], plain[0, mixed, 60:, :]) < SAME
    assert rel_err(fused.mean(channels=mixed), plain.mean(channels=mixed)) < SAME
    core = rec.attention.factors.core
    with pytest.raises(ValueError, match="no kernel for channels"):  # a core that declines, asked directly
        both(rec.attention.only("ssm"))[0]._no_kernel(0, torch.tensor(mixed))
    assert core.tiles(0, torch.tensor(mixed), left=None, right=None, taps=None, input_mask=None,
                      ssm=True, skip=True) is None  # fmt: skip


if kernels.triton is not None:
    import triton.language as tl

    @kernels.triton.jit
    def _split_probe(x_ptr, y_ptr, head_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        """``_tf32_head(x)`` and ``_product(x, y)`` (split TF32) of one ``(M, K)`` and one ``(N, K)`` tile."""
        m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :])
        y = tl.load(y_ptr + n[:, None] * K + k[None, :])
        tl.store(head_ptr + m[:, None] * K + k[None, :], kernels._tf32_head(x))
        tl.store(out_ptr + m[:, None] * N + n[None, :], kernels._product(x, y, True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_split_tf32_products_round_their_heads(device):
    """The tensor-core products every far tile and channel sum takes (``_product``: each operand split into
    a TF32 head and its remainder, three TF32 products): a head is the TF32 value nearest its operand (the
    low 13 bits zero, at most half a TF32 unit away), so the remainders are at most 2⁻¹¹ of it. Over a
    depth of 32 whose columns span six decades, the three products then come within 1e-7 of a float64
    product under the interpreter (6.3e-8) and within 4e-7 compiled, where the tensor cores' float32 sums
    add their own error (2.8e-7 on the H200). Heads cut rather than rounded: 1.7e-7 and 6.0e-7."""
    gen = torch.Generator().manual_seed(0)
    M = N = 64
    K = 32
    x = torch.randn(M, K, generator=gen) * torch.logspace(-3, 3, K)
    y = torch.randn(N, K, generator=gen)
    head, out = torch.empty(M, K, device=device), torch.empty(M, N, device=device)
    _split_probe[(1,)](x.to(device), y.to(device), head, out, M=M, N=N, K=K)
    head, out = head.cpu(), out.cpu()
    assert (head.view(torch.int32) & 8191).eq(0).all()  # a TF32 value: 10 stored mantissa bits
    tf32_unit = torch.ldexp(torch.ones(M, K, dtype=torch.float64), torch.frexp(x)[1] - 11)
    assert float(((x.double() - head.double()).abs() / tf32_unit).max()) <= 0.5
    assert rel_err(out, x.double() @ y.double().T) < (1e-7 if device == "cpu" else 4e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_mamba2_signed_sums_as_products_over_a_heads_channels(monkeypatch, device):
    """Signed channel sums by head take the channels of a head as the depth of tensor-core products,
    ``head_sum_depth`` at a time (``_head_product_sums``): heads of 32 channels in two blocks of 16, one of
    32, one of 64 with 32 masked, and a channel at a time (0), each against the torch path: the mean, a
    weighted sum of a block that cuts the tiles, and the mean of channels of both heads out of order."""
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", True)
    rec, _ = mamba2_record(140, device, head_dim=32)  # two rows, row 0 left-padded
    fused, plain = both(rec.attention)
    assert isinstance(fused._fused_tiles(0, torch.arange(64, device=device)), kernels.HeadTiles)
    gen = torch.Generator().manual_seed(3)
    w_rows, w_cols = (torch.randn(rec.attention.values.shape, generator=gen).to(device) for _ in range(2))
    block = dict(row_weight=w_rows, col_weight=w_cols, rows=slice(30, 140), cols=slice(5, 131))
    mixed = [40, 3, 60, 17, 33, 31]  # channels of both heads (0–31, 32–63), out of order
    expected = plain.mean(), plain.sum(**block), plain.mean(channels=mixed)
    assert expected[0][..., 100:, :40].abs().max() > 1e-3 * expected[0].abs().max()  # far entries matter
    for depth in (16, 32, 64, 0):
        monkeypatch.setitem(kernels.TUNING, "head_sum_depth", depth)
        found = fused.mean(), fused.sum(**block), fused.mean(channels=mixed)
        for a, b in zip(found, expected):
            assert rel_err(a, b) < (SAME if device == "cpu" else SAME_CUDA), depth


@pytest.mark.parametrize("conv, by_head", [(2, True), (5, False)])
def test_mamba2_by_head_conv_widths(monkeypatch, conv, by_head):
    """The by-head kernel takes convs of up to four taps (narrower ones padded with zero taps); wider
    ones go to the scalar-decay ``DiagonalTiles``."""
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", True)
    rec, impulses = mamba2_record(90, "cpu", conv=conv)
    fused, plain = both(rec.attention)
    tiles = fused._fused_tiles(0, torch.arange(8))
    assert isinstance(tiles, kernels.HeadTiles) == by_head and isinstance(tiles, kernels._Tiles)
    # the preparation budget follows the path: a few arrays by head, U, V and W of every state by channel
    N = rec.attention.factors.core.B.shape[-1]
    assert rec.attention.factors.core.fused_work == (8 if by_head else 3 * N + 12)
    assert rel_err(fused.dense(), plain.dense()) < SAME
    assert rel_err(fused.dense(), impulses()) < TOL
    assert rel_err(fused.mean(absolute=True), plain.mean(absolute=True)) < SAME


def rwkv4_record(L, device, *, key_scale=1.0, slow=True, width=16):
    """An HF RWKV-4 time mixing (``width`` channels) on two rows, with a carried state (use_cache) in its
    normaliser; slow decays so that far tiles hold more than underflow, large keys on request."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    cfg = RwkvConfig(vocab_size=64, hidden_size=width, attention_hidden_size=width, intermediate_size=32,
                     num_hidden_layers=2, context_length=1024)  # fmt: skip
    m = randomize(RwkvForCausalLM(cfg), 0).to(device).eval()
    with torch.no_grad():
        att = m.rwkv.blocks[0].attention
        att.key.weight.mul_(key_scale)
        if slow:  # w = exp(time_decay) in 0.002 … 0.05 per step
            att.time_decay.copy_(torch.empty_like(att.time_decay).uniform_(-6, -3))
    ids = torch.randint(0, 64, (2, L), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad(), ih.record(m, layers=[0]) as rec:
        m(ids)
    return rec[0]


@pytest.mark.parametrize("L", [5, 150])
def test_rwkv4_kernel(L):
    """RWKV-4's normalised WKV (``WKVTiles``): one exponential per entry, float64 exponents."""
    rec = rwkv4_record(L, "cpu")
    fused, plain = both(rec.attention)
    A = fused.dense()
    assert rel_err(A, plain.dense()) < SAME
    assert rel_err(fused.output(), rec.real_output) < TOL  # A · v + bias is the block
    R = fused.only("ssm").dense()
    assert rel_err(R, plain.only("ssm").dense()) < SAME
    torch.testing.assert_close(R.sum(-1), torch.ones_like(R[..., 0]), rtol=0, atol=1e-6)  # normalised
    if L > 128:
        assert R[:, :, 128:, :64].max() > 1e-3  # far tiles carry the recurrence
        assert rel_err(fused[:, 3:9, 70:140, 5:100], plain[:, 3:9, 70:140, 5:100]) < SAME
    w = torch.randn(rec.attention.values.shape, generator=torch.Generator().manual_seed(0))
    for transform in ("signed", "abs", "positive"):
        a = fused.mean(transform=transform, row_weight=w, col_weight=w.flip(-1))
        assert rel_err(a, plain.mean(transform=transform, row_weight=w, col_weight=w.flip(-1))) < SAME
    assert torch.all(fused.only("gate").dense() == 0)  # the zeros of a view without the recurrence


def test_rwkv4_kernel_with_large_keys():
    """Keys beyond ±30 with fast decays: exp(k) overflows float32, the kernel's exponents do not."""
    rec = rwkv4_record(140, "cpu", key_scale=25.0, slow=False)
    assert rec.tensors["key"].abs().max() > 30
    fused, plain = both(rec.attention.only("ssm"))
    R = fused.dense()
    assert torch.isfinite(R).all() and rel_err(R, plain.dense()) < SAME


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_rwkv4_far_sums_as_products_over_channels(monkeypatch, device):
    """Channel sums of RWKV-4's far tiles take each channel's rank-one tile as a column of a tensor-core
    product (``_wkv_far_sums``), ``wkv_sum_channels`` at a time: 48 channels in one group as three blocks of
    16 or two of 32 (the last half masked), in groups of one channel, and a channel at a time (0); every
    transform, weighted, against the torch path; and keys beyond ±100, whose column factors ``exp(k_j + …)``
    would overflow float32 unshifted (and their rows' ``exp(−log Z_t …)`` underflow)."""
    tol = SAME if device == "cpu" else SAME_CUDA
    large = rwkv4_record(140, device, key_scale=40.0)
    assert large.tensors["key"].abs().max() > 100
    for rec in (rwkv4_record(150, device, width=48), large):
        fused, plain = both(rec.attention)
        w = torch.randn(rec.attention.values.shape, generator=torch.Generator().manual_seed(0)).to(device)
        transforms = ("signed", "abs", "positive")
        reads = [dict(transform=f, row_weight=w, col_weight=w.flip(-1)) for f in transforms]
        expected = [plain.mean(**options) for options in reads]
        assert expected[1][..., 128:, :64].abs().max() > 1e-3 * expected[1].abs().max()  # far tiles matter
        for items, depth in ((1, 16), (1, 32), (TUNING_ITEMS, 32), (1, 0)):
            monkeypatch.setitem(kernels.TUNING, "reduce_items", items)
            monkeypatch.setitem(kernels.TUNING, "wkv_sum_channels", depth)
            for options, b in zip(reads, expected):
                a = fused.mean(**options)
                assert torch.isfinite(a).all() and rel_err(a, b) < tol, (items, depth, options["transform"])


@pytest.mark.parametrize("family", ["mamba", "mamba2", "rglru", "rwkv4"])
def test_whole_tiles_of_every_kernel_go_out_unmasked_and_right(family):
    """At L = 192 (three whole tiles, every stride a multiple of 16) dense reads are launched ``ALIGNED``
    (16-byte stores; the interpreter ignores the compiler hints, the CUDA tests do not) and far, near,
    strip, WKV and by-head tiles lie whole in the read; the other tests' lengths (5, 65, 140, 150) cut
    tiles and are not aligned."""
    L = 192
    rec, inputs = family_record(family, L, "cpu")
    impulses = None
    if family == "mamba":  # two rows, row 0 left-padded; also against the float64 impulse response
        (hidden, mask), mixer = inputs
        impulses = impulse_matrix(reference(mixer, hidden, mask))
    fused, plain = both(rec.attention)
    A = fused.dense()
    assert kernels._aligned(A[0], 0, L, "tiles") and rel_err(A, plain.dense()) < SAME
    if impulses is not None:
        assert rel_err(A, impulses) < TOL
    assert A[..., 128:, :64].abs().max() > 1e-3 * A.abs().max()  # the far tiles are not all underflow
    assert torch.all(A.triu(1) == 0)
    # tiles above the diagonal's are written as zeros, +0.0 (inside a diagonal tile, the zeros above the
    # diagonal times a negative gate are -0.0, as on the torch path)
    above = (torch.arange(L)[None, :] // kernels.TILE) > (torch.arange(L)[:, None] // kernels.TILE)
    assert not torch.signbit(A[..., above]).any()


def test_aligned_launches_only_where_columns_and_strides_allow_16_byte_stores():
    """``ALIGNED`` promises the compiler that column offsets and strides are multiples of a run of entries:
    a wrong promise would store entries in the wrong places on the GPU, so the host grants it only where
    columns and strides are multiples of 16, and then the run each kernel is tuned for."""
    out = torch.empty(3, 40, 192)
    for kernel, run in kernels.TUNING["aligned_run"].items():
        assert run in (4, 8, 16)  # at most the 16 the host checks
        assert kernels._aligned(out, 0, 192, kernel) == run and kernels._aligned(out, 16, 208, kernel) == run
        assert kernels._aligned(out, 5, 197, kernel) == 0  # the read starts inside a group of 16 columns
        assert kernels._aligned(out, 0, 150, kernel) == 0  # ... or ends inside one
        assert kernels._aligned(torch.empty(3, 40, 150), 0, 192, kernel) == 0  # rows 150 entries apart
        assert kernels._aligned(torch.empty(3, 40, 200)[:, :, :192], 0, 192, kernel) == 0  # a view
        assert kernels._aligned(torch.empty(40, 192), 0, 192, kernel) == run  # a channel sum (2-D)
    # the by-head kernel holds four entries of a row a thread: runs of 4 spare bfloat16 stores a reshuffle
    assert kernels.TUNING["aligned_run"]["head"] == 4


def test_arguments_left_unspecialised_are_arguments_of_each_kernel():
    """Lengths and offsets are compiled once for all values; a name a kernel lacks would be a silent typo."""
    import inspect

    assert set(kernels.UNSPECIALISED) == {
        "_prep_kernel",
        "_far_kernel",
        "_near_kernel",
        "_near_sum_kernel",
        "_strip_kernel",
        "_wkv_kernel",
        "_head_kernel",
        "_head_reduce_kernel",
    }
    for name, unspecialised in kernels.UNSPECIALISED.items():
        parameters = inspect.signature(getattr(kernels, name).fn).parameters
        assert set(unspecialised) <= set(parameters), name
        # every kernel that reads a length compiles once for all of them (the near sums' adding up reads none)
        assert ("L" in unspecialised) == ("L" in parameters), name


def family_record(family, L, device, *, channels=4):
    """One recorded call of a block of each family with a fused kernel, and for Mamba-1 what its impulse
    response needs (``((hidden, mask), mixer)``; None for the others)."""
    if family == "mamba":
        rec, inputs, mixer = record(model(device, channels=channels), L, device)
        return rec, (inputs, mixer)
    if family == "mamba2":
        return mamba2_record(L, device)[0], None
    if family == "rglru":
        return rglru_record(L, device)[0], None
    return rwkv4_record(L, device), None


def test_reads_the_fused_path_cannot_serve_say_why():
    rec, _, _ = record(model("cpu", channels=4), 20, "cpu", batch=1)
    view = rec.attention.with_backend("triton")
    with pytest.raises(ValueError, match="contiguous ranges"):
        view[0, 0, [3, 1], :]
    with pytest.raises(ValueError, match="float32"):
        rec.view(torch.float64).with_backend("triton").dense()
    with pytest.raises(ValueError, match="backend must be one of"):
        rec.attention.with_backend("cuda")
    # auto: the torch path on CPU, the same numbers
    assert rel_err(rec.attention[0, 0, [3, 1], :], rec.attention.with_backend("torch")[0, 0, [3, 1], :]) == 0


def test_last_rows_go_to_the_kernel_where_its_rows_are_faster(monkeypatch):
    """``Core.fused_rows``, what ``backend="auto"`` reads a last-token row with on CUDA: the kernel for
    Mamba-1, Mamba-2 by head and RWKV-4 (faster than the torch path's rows, at less memory: run WW), the torch
    path for Mamba-2 by channel (never measured) and RG-LRU (2x faster, but 1.7x the memory)."""
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", True)
    mamba2 = mamba2_record(40, "cpu")[0].attention.factors.core
    assert mamba2.fused_rows
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", False)
    assert not mamba2.fused_rows
    assert rwkv4_record(40, "cpu").attention.factors.core.fused_rows
    assert not rglru_record(40, "cpu")[0].attention.factors.core.fused_rows
    assert record(model("cpu"), 40, "cpu")[0].attention.factors.core.fused_rows


@needs_cuda
@pytest.mark.parametrize("family", ["rglru", "mamba2", "mamba2 by head", "rwkv4"])
@pytest.mark.parametrize("L", [150, 704])  # stores masked entry by entry, and 16 bytes at a time (aligned)
def test_cuda_rglru_mamba2_rwkv4_kernels_against_the_torch_path(monkeypatch, family, L):
    monkeypatch.setitem(kernels.TUNING, "HEAD_TILES", family == "mamba2 by head")
    if family == "rwkv4":
        rec = rwkv4_record(L, "cuda")
    else:
        rec, _ = rglru_record(L, "cuda") if family == "rglru" else mamba2_record(L, "cuda")
    if family == "mamba2 by head":
        tiles = rec.attention.with_backend("triton")._fused_tiles(0, torch.arange(4, device="cuda"))
        assert isinstance(tiles, kernels.HeadTiles)
    last, every = (_parse_index(s, L, "rows", torch.device("cuda")) for s in (slice(-1, None), slice(None)))
    # a last-token row: the kernel's by head and RWKV-4's are faster than the torch path, at less memory
    by_kernel = family in ("mamba2 by head", "rwkv4")
    assert (rec.attention._fused(last, every) is not None) == by_kernel
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fused, plain = both(rec.attention)
        A = fused.dense()
        assert rel_err(A, plain.dense()) < SAME_CUDA
        assert rel_err(fused.mean(absolute=True), plain.mean(absolute=True)) < SAME_CUDA
        assert rel_err(fused.mean(), plain.mean()) < SAME_CUDA
        narrow = fused.dense(torch.bfloat16)  # rounded as stored: within rounding of the float32 read
        assert narrow.dtype == torch.bfloat16 and rel_err(narrow.float(), A) < 2**-8
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@needs_cuda
@pytest.mark.parametrize("L", [63, 128, 257, 1000])
@pytest.mark.parametrize("state, conv, channels", [(16, 4, 96), (8, 3, 40), (32, 1, 24)])
def test_cuda_kernel_against_the_torch_path(L, state, conv, channels):
    """Compiled kernels at the shapes of real layers (tiles cut at every length), batch 2 with padding."""
    rec, _, _ = record(model("cuda", state=state, conv=conv, channels=channels), L, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch path in true float32
    try:
        view = rec.attention
        every = _parse_index(slice(None), L, "rows", torch.device("cuda"))
        assert view.with_backend("auto")._fused(every, every) is not None
        last = _parse_index(slice(-1, None), L, "rows", torch.device("cuda"))  # Mamba-1's rows: the kernel
        assert view.with_backend("auto")._fused(last, every) is not None
        fused, plain = both(view)
        A = fused.dense()
        assert rel_err(A, plain.dense()) < SAME_CUDA
        narrow = fused.dense(torch.bfloat16)  # rounded as stored: within rounding of the float32 read
        assert narrow.dtype == torch.bfloat16 and rel_err(narrow.float(), A) < 2**-8
        for key in [
            (slice(None), slice(None), slice(-1, None)),
            (0, slice(3, 9), slice(L // 3, L), slice(5, L - 2)),
            (1, slice(None), slice(5, L), slice(16, L - L % 16)),  # aligned columns (16-byte stores)
        ]:
            assert rel_err(fused[key], plain[key]) < SAME_CUDA
        gen = torch.Generator().manual_seed(L)
        w = torch.randn(view.values.shape, generator=gen).cuda()
        for transform in ("abs",):  # each transform is one more compiled kernel; the rest is CPU-tested
            assert (
                rel_err(
                    fused.mean(transform=transform, row_weight=w),
                    plain.mean(transform=transform, row_weight=w),
                )
                < SAME_CUDA
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@needs_cuda
@pytest.mark.parametrize("family", ["mamba", "mamba2", "rglru", "rwkv4"])
def test_cuda_fused_reads_never_wait_for_the_device(family):
    """Indices are parsed and every launch decided on the host: dense, block and mean reads queue their
    work without one synchronising call, so the host prepares while the device computes; last-token rows
    neither, on the torch path or the kernel (whichever ``"auto"`` takes)."""
    rec, _ = family_record(family, 200, "cuda", channels=8)  # Mamba-2: by head, one group of B/C
    view = rec.attention.with_backend("triton")
    view.dense(), view.mean(), view.dense(torch.bfloat16)  # compiled before counting (may synchronise)
    assert cuda_syncs(view.dense) == 0
    assert cuda_syncs(lambda: view.dense(torch.bfloat16)) == 0
    assert cuda_syncs(lambda: view[:, 1:3, 70:190, 5:150]) == 0
    assert cuda_syncs(lambda: view.mean(absolute=True)) == 0
    for backend in ("torch", "auto"):
        row = rec.attention.with_backend(backend)
        row[0, :, -1]
        assert cuda_syncs(lambda row=row: row[0, :, -1]) == 0


@pytest.mark.parametrize("family", ["mamba", "mamba2", "rglru", "rwkv4"])
def test_fused_reads_take_runs_of_channels_as_views(family):
    """A fused read of a run of channels passes them to the core as a slice: its per-channel arrays are
    views, neither gathered (``index_select``), copied (``clone``) nor sorted on every read (each such kernel
    costs 10–20 µs of host time on the H200's machine, as much as the write floor of a short read); a run that
    does not start at channel 0, and a list, read the same entries as the torch path."""
    rec, inputs = family_record(family, 70, "cpu")
    fused, plain = both(rec.attention)
    fused.dense()  # the factors, once
    with Ops() as ops:
        A = fused.dense()
    # nor sorted by head, searched or numbered on the device (Mamba-2's run maps to its heads on the host)
    copies = ("index_select", "clone", "sort", "searchsorted", "arange", "flip", "constant_pad")
    assert [name for name in ops.names if name.startswith(copies)] == []
    assert rel_err(A, plain.dense()) < SAME
    C = rec.attention.shape[1]
    run, listed = slice(1, C - 1), [C - 1, 0, 2]
    assert rel_err(fused[:, run], plain[:, run]) < SAME
    assert rel_err(fused[:, listed, 5:], plain[:, listed, 5:]) < SAME
    assert rel_err(fused.mean(channels=run), plain.mean(channels=run)) < SAME
    if family == "mamba":  # two rows, row 0 left-padded: a run read as views against the float64 recurrence
        (hidden, mask), mixer = inputs
        assert rel_err(fused[:, run], impulse_matrix(reference(mixer, hidden, mask))[:, run]) < TOL


class _NoLaunch:
    """A kernel whose launches do nothing (``kernel[grid](...)``)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("family", ["mamba", "rglru", "rwkv4"])
def test_a_read_of_a_kept_batch_row_runs_no_torch_operation_but_allocations(monkeypatch, family):
    """Before its launches, a fused read of every channel of a batch row read before allocates its output
    and the kernels' arrays and takes the output's batch row, and runs no other torch operation: the
    batch row of the core's arrays (``Core.rows_of``) and of the diagonal factors and their products
    (``AttentionView._diagonal``) are kept from the first read, a run of every channel is the arrays
    themselves (``take``), and arrays already in float32 are not converted again (``kernels._contiguous``).
    Each torch operation costs the host a few µs on the H200's machine, whose short reads the host issues
    about as long as the device runs them (run DDD: Mamba-1's read 24 → 11 operations)."""
    rec, _ = family_record(family, 70, "cpu")
    fused = rec.attention.with_backend("triton").with_output_dtype(torch.bfloat16)
    first = fused[1]
    for name in [n for n in dir(kernels) if n.startswith("_") and n.endswith("_kernel")]:
        monkeypatch.setattr(kernels, name, _NoLaunch())
    with Ops() as ops:
        again = fused[1]
    assert again.shape == first.shape and again.dtype == torch.bfloat16
    others = [name for name in ops.names if not name.startswith(("empty", "new_empty"))]
    assert len(others) <= 3 and all(name.startswith(("select", "squeeze", "unsqueeze")) for name in others), (
        ops.names
    )


def test_diagonal_preparation_runs_no_torch_operation_per_read():
    """:class:`kernels.DiagonalTiles` prepares everything its kernels read in one pass of its own kernel:
    the sums of ``S`` (each position's sum through its tile, the tiles' bounds, totals and far references,
    each strip's growths, the tiles' reference segments) equal torch's float64 sums, and besides
    allocations no torch operation runs (each costs the host 10–25 µs a read on the H200's machine)."""
    # allocations, views, and the interpreter's copies into and out of its buffers
    plumbing = ("empty", "new_empty", "set_", "copy_", "select", "slice", "unsqueeze", "view", "detach")

    gen = torch.Generator().manual_seed(3)
    nc, L, N, K, Q = 3, 150, 16, 4, kernels.TILE
    rates = torch.rand(nc, L, generator=gen, dtype=torch.float64) * 0.05
    S = torch.nn.functional.pad(rates.cumsum(1), (1, 0))
    A = -torch.rand(nc, N, generator=gen) * 8
    B, C = torch.randn(L, N, generator=gen), torch.randn(L, N, generator=gen)
    segment = (torch.arange(L) >= 100).to(torch.int32)  # one reset, at position 100
    weight, right, left = (torch.rand(nc, L, generator=gen) for _ in range(3))
    arrays = (S, A, B, C, weight, torch.randn(nc, generator=gen), segment)
    factors = dict(left=left, right=right, taps=torch.randn(nc, K, generator=gen), input_mask=None)
    kernels.DiagonalTiles(*arrays, **factors, ssm=True, skip=True)  # a first read makes the shared constants
    with Ops() as ops:
        tiles = kernels.DiagonalTiles(*arrays, **factors, ssm=True, skip=True)
    assert [name for name in ops.names if not name.startswith(plumbing)] == []
    with Ops() as ops:  # a channel sum without weights makes no tensor of ones to read them from
        plain = tiles.reduce(0, L, 0, L, transform="abs")
    assert not [name for name in ops.names if name.startswith(("ones", "fill", "full"))], ops.names
    weighted = tiles.reduce(0, L, 0, L, transform="abs", row_weight=torch.ones(nc, L),
                            col_weight=torch.ones(nc, L))  # fmt: skip
    assert torch.equal(plain, weighted)

    f32, p = torch.float32, torch.arange(L)
    bounds = (torch.arange(L // Q + 2) * Q).clamp(max=L)  # tile starts, then L
    ref = ((torch.arange(len(bounds) - 1) + 1) * Q + K - 1).clamp(max=L)
    strips = torch.arange(0, L, kernels.STRIP)
    assert torch.equal(tiles.sloc, (S[:, p + 1] - S[:, p // Q * Q]).to(f32))
    assert torch.equal(tiles.sb, S[:, bounds])
    assert torch.equal(tiles.tot, (S[:, bounds[1:]] - S[:, bounds[:-1]]).to(f32))
    assert torch.equal(tiles.sref, S[:, ref])
    assert torch.equal(tiles.seg_ref, segment[ref - 1])
    for which, past in enumerate((K - 1, kernels.STRIP + K - 1)):  # the strip's, its diagonal block's
        span = (S[:, (strips + past).clamp(max=L)] - S[:, strips]).to(f32)
        assert torch.equal(tiles.growth[..., which], A.abs().amax(1, keepdim=True) * span)


def core_formula(S, A, B, C, weight, right, D, segment):
    """``core[c, t, m]`` of :class:`kernels.DiagonalTiles` straight from its definition, in float64: the
    recurrence's entries ``Σ_n C[t, n] e^{A_n (S_{t+1} − S_{m+1})} w_m r_m B[m, n]`` for ``m ≤ t`` in one
    segment, and the skip ``D r_m`` on the diagonal."""
    L = weight.shape[1]
    f64 = torch.float64
    gap = S[:, 1:, None] - S[:, None, 1:]  # (nc, t, m): S_{t+1} − S_{m+1}
    linked = torch.tril(torch.ones(L, L, dtype=torch.bool)) & (segment[:, None] == segment[None, :])
    gap = torch.where(linked, gap, torch.zeros((), dtype=f64))  # exponents ≤ 0 where they count
    decay = torch.exp(A.to(f64)[:, None, None, :] * gap[..., None])  # (nc, t, m, n)
    core = torch.einsum("tn,ctmn,mn->ctm", C.to(f64), decay, B.to(f64)) * linked
    core = core * (weight * right).to(f64)[:, None, :]
    return core + torch.diag_embed(D.to(f64)[:, None] * right.to(f64))


def test_diagonal_tiles_of_many_states_across_resets_match_the_formula(monkeypatch):
    """Mamba-1-like arrays (16 states, so the far tiles take the tile product, :func:`kernels._far_rows`
    computing their row factors) with two resets, left and right factors, a conv of 4 taps and an input
    mask: dense blocks and channel sums against the documented formula ``A[t, j] = g_t p_j Σ_k w_k
    core[t, j + k]`` evaluated in float64."""
    gen = torch.Generator().manual_seed(5)
    nc, L, N, K = 3, 150, 16, 4
    rates = torch.rand(nc, L, generator=gen, dtype=torch.float64) * 0.05
    S = torch.nn.functional.pad(rates.cumsum(1), (1, 0))
    A = -torch.rand(nc, N, generator=gen) * 2
    B, C = torch.randn(L, N, generator=gen), torch.randn(L, N, generator=gen)
    segment = (torch.arange(L) >= 40).to(torch.int32) + (torch.arange(L) >= 130).to(torch.int32)
    weight, right, left = (torch.rand(nc, L, generator=gen) for _ in range(3))
    D, taps = torch.randn(nc, generator=gen), torch.randn(nc, K, generator=gen)
    mask = (torch.rand(L, generator=gen) > 0.1).float()
    tiles = kernels.DiagonalTiles(S, A, B, C, weight, D, segment, left=left, right=right, taps=taps,
                                  input_mask=mask, ssm=True, skip=True)  # fmt: skip

    core = core_formula(S, A, B, C, weight, right, D, segment)
    expected = torch.zeros(nc, L, L, dtype=torch.float64)
    for k in range(K):  # column j sees position j + k through tap w_k = taps[:, K − 1 − k]
        expected[:, :, : L - k] += taps[:, K - 1 - k, None, None].double() * core[:, :, k:]
    expected *= left.double()[:, :, None] * mask.double()[None, None, :]
    assert expected[:, 128:, :64].abs().amax() > 1e-3 * expected.abs().amax()  # the far tiles matter

    dense = tiles.dense(0, L, 0, L)
    assert rel_err(dense, expected) < TOL
    assert torch.all(dense[:, 130:, :127] == 0) and torch.all(dense[:, 40:, :37] == 0)  # the resets cut
    assert rel_err(tiles.dense(70, 150, 3, 101), expected[:, 70:, 3:101]) < TOL  # a block off the tile grid
    assert rel_err(tiles.reduce(0, L, 0, L), expected.sum(0)) < TOL
    # signed far sums as products over channels × states: 4 channels a product (a block of 3) and 2 (a
    # block of 2 and one of 1), and a channel at a time
    for depth in (64, 32, 16):
        monkeypatch.setitem(kernels.TUNING, "far_sum_depth", depth)
        assert rel_err(tiles.reduce(0, L, 0, L), expected.sum(0)) < TOL, depth
