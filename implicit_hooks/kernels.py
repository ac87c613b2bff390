"""Fused Triton assembly of implicit attention: dense blocks and channel reductions of diagonal-state cores
(Mamba-1, RG-LRU, Mamba-2: :class:`DiagonalTiles`; Mamba-2's dense blocks by head, :class:`HeadTiles`) and
of RWKV-4's normalised WKV (:class:`WKVTiles`).

The torch path (:meth:`AttentionView._block`) builds a tile in a dozen passes over memory (core, the
column factors, ``K`` conv shifts, the gate); these kernels write each ``64 × 64`` output tile once,
from registers. Per channel ``c`` (``docs/maths.md``; :class:`DiagonalTiles` says how each family maps)::

    A[t, j] = g[t] · Σ_k w_k · core[t, j + k] · p[j]          (conv taps w_k = conv[c, K-1-k])
    core[t, m] = [seg_t = seg_m] · Σ_n C[t, n] · exp(A_n (S_{t+1} − S_{m+1})) · u_m r_m B[m, n]
                 + D r_m [t = m]

with ``S`` a non-decreasing cumulative rate (float64; ``ΣΔ`` for Mamba-1, ``−Σ log a`` for RG-LRU),
``A_n ≤ 0``, ``u`` the input weight (``Δ``; RG-LRU's input scale), ``r`` the right factors (activation
slope, mask), ``g`` the left ones (gate), ``p`` the input mask and ``seg`` a reset count (RG-LRU).
Positions are cut into tiles of ``Q = 64``:

* **far tiles** (row tile ``I ≥ J + 2``): every decay factorises through two tile boundaries, each
  factor ``≤ 1`` (so nothing overflows)::

      A[t, j] = Σ_n U[t, n] · exp(A_n (S_{IQ} − S_ref(J))) · V[j, n]
      U[t, n] = g[t] C[t, n] exp(A_n (S_{t+1} − S_{IQ})),
      V[j, n] = p[j] Σ_k w_k exp(A_n (S_ref(J) − S_{j+k+1})) u_{j+k} r_{j+k} B[j+k, n],
      S_ref(J) = S_{(J+1)Q+K−1}

  (``V``, ``O(L·N)`` per channel, is prepared by :func:`_prep_kernel`, one pass, ``U`` computed once per
  row tile by the far program from ``C``, :func:`_far_rows`, or prepared too for ``N < 16`` states; the
  tile is one ``Q×N×Q`` product and nothing else an entry);
* **near tiles** (``I ∈ {J, J+1}``): each column is seen from its last conv tap ``m = j + K − 1``, so the
  conv folds into the input side as it does for ``V`` and costs nothing in the tile::

      A[t, j] = g[t] p[j] · Σ_n C[t, n] · exp(A_n (S_{t+1} − S_{m+1})) · W[j, n]      (t ≥ m)
      W[j, n] = Σ_k w_k exp(A_n (S_{m+1} − S_{j+k+1})) u_{j+k} r_{j+k} B[j+k, n]

  one exponential per entry and state (one per entry with a scalar rate, ``C·Wᵀ`` then a product), the
  gaps from per-tile local sums (float32 of small numbers); ``W`` and ``C`` are kept state-major, so that
  loading one state for a run of rows or columns reads a run of memory. With ``N ≥ 16`` states (Mamba-1)
  they go by 16-row strips: a strip factorises through its first row ``R`` like a far tile on the columns
  whose factors ``e^{A_n (S_R − S_{m+1})}`` cannot grow (``j ≤ R − K``: the last tap before ``R``), on the
  ``K − 1`` columns before its 16×16 diagonal block where those grow by at most ``e^STRIP_GROWTH``, and on
  the block where its columns grow as little. Dense reads (:func:`_strip_tiles`, in the far kernel's
  program of the row tile) compute what the product leaves out, the entries of each 16×16 block below its
  diagonal, every entry directly, four strips' at once, and store them over it, and leave tile ``I − 1`` to
  the far product where the tile's first strip factorises;
  channel sums (:func:`_strip_sums`) take such a strip's every entry directly. The ``K`` diagonals
  ``0 ≤ t − j < K`` are ``fix``, prepared with ``W`` as whole entries (the taps at or before ``t`` and the
  skip) and stored over the tile after it (:func:`_store_band`; channel sums put them in registers);
* tiles above the diagonal are zeros.

The far and strip products run on the tensor cores as three TF32 products of split operands (about float32
accuracy: 2e-7 from IEEE float32 products on the H200; plain TF32 is too coarse and Triton 3.6's
``"tf32x3"`` faulted in these kernels), the rest in IEEE float32; ``exp`` is the GPU's fast one, one
``MUFU.EX2`` (:func:`_exp`): the result matches the torch path to ≤ 1e-5 relative. Two launches per read,
so that each kernel keeps its own registers: one for the far tiles (one program per row tile, the row
factors loaded once, the zeros above the diagonal too), one for the near tiles; Mamba-1's dense reads take
one, the far program of a row tile doing its near tiles after its far ones: one launch fewer for the host to
issue (at L = 512 a read's kernels take about as long as the host takes to issue them).
For any block of rows and columns, :meth:`DiagonalTiles.dense` writes ``(channels, rows, cols)`` and
:meth:`DiagonalTiles.reduce` sums channels inside each program (with optional row/column weights and the
``abs``/``positive`` transforms), writing one ``(rows, cols)`` per channel group, so a channel mean never
holds ``channels × L × L``. Reads whose columns and output strides are multiples of 16 (every dense read
with ``L`` a multiple of 16) are launched ``ALIGNED`` and store 16 bytes at a time (:func:`_store_at`).
Measured on the H200 (``benchmarks/results/gpu.md``), through the view, preparation included, lone dense
reads at L = 512 / 1024 / 2048 take 2.5–3.1× / 1.7–1.9× / 1.5× the write floor (Mamba-1, 1536 channels;
1.3× at 4096), 2.1–2.9× / 1.7–2.0× / 1.65× (Mamba-2), 1.8–2.5× / 1.35–1.6× / 1.2× (RG-LRU, 2560
channels), 1.8–2.8× / 1.35–1.7× / 1.2× (RWKV-4, 1024 channels); reads issued back to back (the host
issuing one while the device runs the one before) 1.88–1.97× / 1.53–1.60× / 1.38–1.42× (Mamba-1, whose
two kernels alone take 1.87× at 512; run AAA) and
1.2–1.7× / 1.2–1.6× / 1.1–1.6× (the others; Mamba-2 1.23–1.28× since its tiles stream past the L2 while its
factors stay in it, ``TUNING["evict"]``); the torch path 983× and 131× at L = 512 (Mamba-1, RWKV-4). Every
preparation runs in the kernels (:func:`_prep_kernel`; the WKV and by-head kernels read the core's arrays as
they are): on the H200's machine each torch operation costs the host 10–25 µs, as much as a short read's
kernels.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

try:  # optional: the torch path serves wherever Triton is missing
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

#: tile size (rows and columns; conv widths up to ``TILE + 1``)
TILE = 64
#: conv columns past a tile that :class:`HeadTiles` computes (``tl.dot`` wants 16), and its widest conv
HEAD_HALO = 16
HEAD_TAPS = 4
TRANSFORMS = {"signed": 0, "abs": 1, "positive": 2}
#: code paths and launch settings (benchmarks/bench_kernel.py compares them): the far tiles as one tile
#: product (``FAR_DOT``; ``N < 16`` always takes ``N`` outer products), its operands split for three TF32
#: tensor-core products (``FAR_SPLIT_TF32``, :func:`_product`: 2e-8 from the IEEE float32 product on
#: the H200, 20 % faster; Triton 3.6's own ``"tf32x3"`` faults in these kernels; the same switch takes
#: Mamba-1's strips and Mamba-2's by-head core to the tensor cores), Mamba-2's dense blocks by head
#: (``HEAD_TILES``), warps.
TUNING: dict = {
    "FAR_DOT": True,
    "FAR_SPLIT_TF32": True,
    "far_warps": 4,
    "near_warps": 4,
    # warps of dense reads stored in 16 bits, by kernel (RG-LRU's: Mamba-1's near tiles go by strips,
    # Mamba-2's reads by head). On the H200, bfloat16 at L = 512-2048: near tiles at 2 warps 12-13 % faster
    # than at 4 (1 warp slower), outer-product far tiles at 8 2-2.5 % faster; in float32 both are slower
    # (the same bits; run XX)
    "narrow_warps": {"near": 2, "far_outer": 8},
    "wkv_warps": 4,
    "HEAD_TILES": True,
    # Mamba-2 by head: dense blocks at 4 warps (10 % faster than 8 at L = 2048 since the core went to the
    # tensor cores, the same matrix bit for bit; benchmarks/results/sweep_v.json), channel sums at 8
    "head_warps": 4,
    "head_reduce_warps": 8,
    # entries an aligned store may take at once (ALIGNED, _store_at), by kernel ("tiles": the far, near and
    # strip kernels): 16 stores 16 bytes of bfloat16 at a time; the by-head kernel holds 4 entries of a row
    # a thread, and wider runs made its bfloat16 stores reshuffle each tile through shared memory first
    "aligned_run": {"tiles": 16, "wkv": 16, "head": 4},
    "NEAR_STRIPS": True,
    # dense reads by strips: the far kernel's program asks for its strips' lines into the L1 when it starts
    # (_prefetch_near, one line a lane), so that they arrive while its far tiles run: 2–4 % faster at L = 512,
    # 1–2 % at 1024, the same bits (runs CCC, DDD)
    "NEAR_PREFETCH": True,
    # dense reads whose far loop loads each tile's factors a tile ahead, by the bytes of an output entry:
    # stored in bfloat16 2–5 % faster at L = 512–2048, in float32 1–2 % slower (the same bits; run XX); with
    # the far tiles in a loop of their own (_far_run, run AAA) bfloat16 4 % / 9 % faster at 512 / 1024,
    # float32 2.5 % faster at 512 and 0.5–1 % slower at 1024 and 2048
    "far_ahead": (2,),
    # L2 eviction policies of dense reads by kernel, (stores, loads) ("": the default): the output streams
    # past the L2 ("evict_first") and the factors every tile re-reads stay in it ("evict_last"; the by-head
    # kernel's only). Kernels: "head", "wkv", "near", "near_scalar", "far", "far_strips" (Mamba-1's far
    # kernel with its near tiles), "far_wide", "far_outer" (their far and zero tiles; the near kernel's tiles,
    # not the band stored over them)
    # On the H200 (run YY, each setting in its own process), the by-head kernel 0.374 → 0.294 ms in bfloat16
    # at L = 512, 6.02 → 5.47 ms at 2048 (float32 0.494 → 0.427, 8.10 → 7.44); RWKV-4's 7 % / 2.5 % faster;
    # Mamba-1's far tiles 1.5–3.4 % in float32 at 512–2048; RG-LRU's far tiles −1.5 to +2.5 %, its near tiles
    # (the band stored over them) 3–5 % slower: left out
    "evict": {
        "head": ("evict_first", "evict_last"),
        "wkv": ("evict_first", ""),
        "far_strips": ("evict_first", ""),
    },
    # the preparation (_prep_kernel): positions a program (at most, and at most prep_elements / NP) and
    # warps (wide states, NP ≥ 64, take 4). Two warps: Mamba-1's preparation 0.110 → 0.092 ms at L = 512,
    # 0.438 → 0.369 ms at 2048, RG-LRU's (one state: four warps held one position in 128 threads) 0.079 →
    # 0.033 and 0.313 → 0.127 ms, the same arrays bit for bit (benchmarks/results/sweep_ll.json)
    "prep_positions": 64,
    "prep_elements": 2048,
    "prep_warps": 2,
    # programs an SM of the by-head kernels (HeadTiles), each looping over its items: as many as run at
    # once (dense blocks: 255 registers at 4 warps, two an SM), channel sums four
    "head_programs_per_sm": 2,
    "head_reduce_programs_per_sm": 4,
    # channel sums by channel split the channels into groups until a read has about this many (tile, group)
    # programs, a slab of partial sums each, summed afterwards (_Tiles.reduce)
    "reduce_items": 2048,
    # channel sums of near tiles (by channel, without strips) split the channels into groups until a read has
    # about this many (tile, group) programs, partial sums of whole tiles added up afterwards: the far
    # kernel's groups count every tile of the read, and left the near kernel 128 programs at L = 2048 (RG-LRU,
    # 2560 channels: near sums 10.8 → 6.7 ms; 16k 80 → 53 ms, run SS). Since each channel's factors load a
    # channel ahead (run TT), fewer groups: near sums and their adding-up 0.52 → 0.28 ms at L = 512, 0.63 →
    # 0.51 at 1024, 1.14 → 1.01 at 2048 against 4096 items, at 16k 7.91 → 7.96 ms
    "near_reduce_items": 512,
    # channels a tensor-core product of one-state far tiles takes at once (RG-LRU's channel sums,
    # _rank_one_sums): 32 against 16, far sums 0.565 → 0.485 ms at L = 2048, 34 → 30 ms at 16k (run SS)
    "rank_one_channels": 32,
    # channels a tensor-core product of RWKV-4's far tiles takes at once (channel sums, _wkv_far_sums: each
    # channel's far tile is rank one); 0: a channel at a time. 130M-width layer (1024 channels, run UU-7),
    # the kernel at L = 512 / 2048 / 16k: a channel at a time 0.147 / 2.00 / 119 ms, 16 at once 0.119 /
    # 1.38 / 62.1 (no spill), 32 at once 0.110 / 1.19 / 48.9 (120 bytes spilled outside the products' loop)
    "wkv_sum_channels": 32,
    # the depth of one tensor-core product in the signed channel sums of far tiles of 16-63 states (Mamba-1:
    # 64 / 16 = 4 channels at once, _far_product_sums); at most one channel's states: a product a channel.
    # Run TT-3, Mamba-1 far sums at L = 512 / 2048 / 16k: 0.144 / 2.66 / 164 ms a channel at a time, 64 deep
    # 0.137 / 2.46 / 128, 32 deep 0.199 / 3.48 / 178 (8 warps: 2-3x slower; 128 deep spills 1.3 KB)
    "far_sum_depth": 64,
    # Mamba-2's channel sums split the heads into groups until a read has about this many (tile, group) items
    # (tiles counted over the read's square, L = 4096: 2 groups; 16k: 1; the slabs take ≤ 8192 tiles, 128 MB).
    # 130M layer, run SS: means at 512 / 1024 / 2048 / 4096 1.13 → 0.39 / 2.23 → 1.42 / 6.27 → 6.28 /
    # 26.2 → 23.6 ms against one group; 2048 items left 1024 ≈ 1.5 ms and made 2048 (2 groups) 1.5 % slower
    "head_reduce_items": 8192,
    # channels of a head one tensor-core product of Mamba-2's signed channel sums takes at once
    # (_head_product_sums), at head_product_warps; 0: a channel at a time (_head_channels), as |·| and
    # positive parts always are. 130M layer, run UU-2, the kernel at L = 512 / 2048 / 16k: a channel at a
    # time (8 warps) 0.395 / 6.33 / 363 ms; 32 deep at 4 warps 0.167 / 2.16 / 105; 16 deep 0.181 / 2.42 / 121;
    # 64 deep 0.304 / 4.01 / 183. At 8 warps Triton 3.6 compiles the products' operands to read shared memory
    # out of bounds (compute-sanitizer, UU-4): wrong sums (0.6 % of the norm at N = 16) or a fault
    "head_sum_depth": 32,
    "head_product_warps": 4,
    # ptxas register caps of dense launches by kernel ("far": tile products of N < 64 states, "far_wide",
    # "far_outer": N < 16, "near", "near_scalar" (Mamba-2), "strip", "wkv", "head"; reductions: the same
    # names + "_reduce"; none: ptxas chooses, up to 255), traded against spills for more programs an SM.
    # On the H200, 168 registers (3 programs of 4 warps an SM) made dense reads 6–9 % faster at L = 2048,
    # the same matrices bit for bit (benchmarks/sweep_dense.py); reductions would spill 160–1500 bytes.
    # Mamba-1's far kernel, which takes its near tiles too: 128 (four programs an SM), 5–7 % faster than 168
    # at L = 1024 and 2048 (benchmarks/results/sweep_jj.json); it fits without a spill (127 registers; run
    # PP's U spilled 8 bytes until run QQ split U once per row tile). Again with the far tiles in a loop of
    # their own (run AAA, L = 512 / 1024): 168 registers 0.574 → 0.635 / 1.997 → 2.034 ms in float32, 0.430 →
    # 0.477 / 1.273 → 1.437 in bfloat16; uncapped slower still.
    # Mamba-1's far kernel on short reads stored in 16 bits ("far_short", TUNING["short_tiles"]): 96 (five
    # programs an SM, 88 bytes spilled) with its first strips unrolled (UNROLL), the same matrices bit for
    # bit; on the H200 (run BBB) bfloat16 0.431–0.434 → 0.408–0.409 ms at L = 512, 1.272–1.275 → 1.208–1.210
    # at 1024 (96 registers alone 0.424 / 1.26, unrolled alone 0.428 / 1.267). Not for longer reads nor
    # float32, where the far loop's spills cost more than the fifth program hides: 96 registers took 4.33 →
    # 4.45 ms at 2048 in bfloat16, 2.02 → 2.09 ms at 1024 in float32
    # Mamba-1's preparation ("prep"; "prep_wide": NP ≥ 64, "prep_outer": N < 16): 96 (10 programs of 2
    # warps an SM, 8 at its 123, no spill), 6–7 % faster at L = 512 and 2048, the same arrays bit for bit
    # (benchmarks/results/sweep_pp.json).
    "maxnreg": {"far": 128, "far_short": 96, "near": 168, "wkv": 168, "prep": 96},
    # dense reads of up to this many column tiles are short (Mamba-1's far kernel: "far_short" above):
    # there its row tiles' near tiles, bound by the latency of their loads, hold a larger share of the work
    "short_tiles": 16,
}


#: every launch contracts ``a·b + c`` into one FMA, as Triton has by default up to 3.9: Triton 3.10 turns
#: the default off (3.9 warns), which would split the by-head kernel's four multiply-adds an entry, the
#: strips' and the WKV kernel's into multiplies and adds (``fma.rn`` in the PTX: 116 → 0 by head, 42 → 0
#: in Mamba-1's strips; the same PTX with the option given, Triton 3.6, sm_90)
FP_FUSION = {"enable_fp_fusion": True}


def _contiguous(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``x`` in ``dtype`` and contiguous: ``x`` itself where it already is. ``.to`` and ``.contiguous`` return
    ``x`` then too, but each goes through torch's dispatch (a few µs of the host a call on the H200's
    machine, where a short read is issued by the host about as long as the device runs it)."""
    return x if x.dtype == dtype and x.is_contiguous() else x.to(dtype).contiguous()


def _options(kernel: str, warps: int, reduce: bool) -> dict:
    """Launch options of ``kernel``: its warps, FMA contraction (:data:`FP_FUSION`) and, where
    ``TUNING["maxnreg"]`` caps it, its registers."""
    cap = TUNING["maxnreg"].get(kernel + "_reduce" if reduce else kernel)
    options = {"num_warps": warps, **FP_FUSION}
    return options if cap is None else {**options, "maxnreg": cap}


#: near tiles by row strips of ``STRIP`` rows (:func:`_strip_sums`), whose column factors may grow by at most
#: ``e^STRIP_GROWTH`` (larger: every entry directly). A factorised term ``u·y`` is the term itself, each
#: factor rounded once, so growth costs no accuracy until float32's range: a row factor ``u ≤ 1`` flushed to
#: zero (below ``e^-87.3``) drops a term of at most ``e^(STRIP_GROWTH − 87.3)`` (``3e-21`` at 40) of
#: ``|C·W|``, and a column factor ``y ≤ e^STRIP_GROWTH |W|`` overflows only where ``|W| > 10²¹``. Measured
#: on the H200 against the float64 torch path (run CCC, the benchmark's Mamba-1 layer, L = 512 – 2048):
#: 8 → 40 moves float32's relative error 1.51e-6 → 1.52e-6 and neither its largest entry error against
#: its row's largest nor the bfloat16 entries that differ from float64's rounding; fewer strips go entry by
#: entry: Mamba-1's dense far kernel 5–8 % faster at L = 512, its channel sums' strip kernel 18–20 %. Was 8,
#: from an error estimate (``growth·2⁻²⁴``) and a comparison with its own reads, not with float64.
STRIP = 16
STRIP_GROWTH = 40.0


def available(device: torch.device, *, interpreted: bool = False) -> bool:
    """Whether the fused kernels can run for tensors on ``device``.

    CUDA with Triton installed; with ``interpreted``, also CPU tensors under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before this module is imported), which the tests use to check the
    kernels where no GPU exists (far too slow for anything else).
    """
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return interpreted and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    #: Triton's interpreter (the tests without a GPU) has no libdevice: :func:`_exp` takes ``tl.exp`` there
    _INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    #: ``log₂e``: exponents scaled by it once (a rate, or a gap shared by every state) take ``2^x`` directly
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _exp2(x):
        """``2^x`` as one ``MUFU.EX2``, subnormal results flushed to zero (libdevice's ``exp2`` under Triton's
        default reflect-ftz): ``tl.exp`` guards subnormal results with three more instructions an entry (a
        compare and two multiplies), a fifth of what a near tile issues."""
        if _INTERPRETED:
            return tl.exp2(x)
        else:
            return libdevice.exp2(x)

    @triton.jit
    def _exp(x):
        """``e^x``: :func:`_exp2` of ``x · log₂e`` (one multiply more an entry than a pre-scaled exponent)."""
        return _exp2(x * LOG2E)

    @triton.jit
    def _row_factors(c_rows, a, sl, left):
        """``U = g_t C[t, n] e^{A_n sl_t}`` from rows of ``C``, the rates, the sums ``sl`` since the row
        tile's start and the left factors ``g`` (zero past a reset): :func:`_far_rows` and, for the outer
        products, :func:`_prep_kernel`."""
        return c_rows * _exp(a[None, :] * sl[:, None]) * left[:, None]

    @triton.jit
    def _far_rows(c, I, L, ssm, A_ptr, Cr_ptr, sloc_ptr, left_ptr, seg_ptr, N: tl.constexpr, NP: tl.constexpr,
                  Q: tl.constexpr, FAR_DOT: tl.constexpr):  # fmt: skip
        """The row factors of row tile ``I`` for the tile product, ``U[t, n] = g_t C[t, n] exp(A_n (S_{t+1} −
        S_{IQ}))`` (``Q × NP``; zero past a reset since the tile's start, and without the recurrence),
        computed here from ``C`` (shared by the channels): one exponential an entry, once per row tile,
        where a prepared ``U`` cost the preparation a store and the far program a load of ``Q × NP``
        entries. ``C`` is read row-major (``Cr``, ``L × N``): loaded with a thread's states in a run, ``U``
        takes the layout whose middle factor costs a thread 4 exponentials a tile, the state-major copy's
        8. The outer products (``N < 16``) read ``U`` prepared (:func:`_prep_kernel`): their tile is too
        little work to hide computing it, once a tile in channel sums.

        Returned with its TF32 head (:func:`_tf32_head`), split once per row tile for every far tile's
        :func:`_split_product` (unused without ``SPLIT``)."""
        t = I * Q + tl.arange(0, Q)
        if FAR_DOT:
            c_rows, same = _far_row_parts(I, L, ssm, Cr_ptr, seg_ptr, N, NP, Q)
            left, sl, a = _far_channel_rows(c, t, L, ssm, same, A_ptr, sloc_ptr, left_ptr, N, NP)
            u = _row_factors(c_rows, a, sl, left)
            return u, _tf32_head(u)
        else:
            return t, t  # unused: the outer products load U per state

    @triton.jit
    def _far_row_parts(I, L, ssm, Cr_ptr, seg_ptr, N: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr):
        """What row tile ``I``'s factors share across channels (:func:`_far_rows`): the rows of ``C`` and
        where the rows lie in the tile's first segment."""
        t = I * Q + tl.arange(0, Q)
        n = tl.arange(0, NP)
        t_ok = t < L * ssm  # ssm is 0 or 1; a scalar condition in a mask fails Triton 3.9's interpreter
        before = tl.load(seg_ptr + tl.maximum(I * Q - 1, 0))
        same = tl.load(seg_ptr + t, mask=t_ok, other=0) == before
        c_rows = tl.load(Cr_ptr + t[:, None] * N + n[None, :], mask=t_ok[:, None] & (n < N)[None, :],
                         other=0.0)  # fmt: skip
        return c_rows, same

    @triton.jit
    def _far_channel_rows(c, t, L, ssm, same, A_ptr, sloc_ptr, left_ptr, N: tl.constexpr, NP: tl.constexpr):
        """Channel ``c``'s part of its row factors on rows ``t`` (:func:`_far_rows`): its left factors (zero
        past a reset), its sums since the tile's start and its rates."""
        n = tl.arange(0, NP)
        t_ok = t < L * ssm
        left = tl.where(same, tl.load(left_ptr + c * L + t, mask=t_ok, other=0.0), 0.0)
        sl = tl.load(sloc_ptr + c * L + t, mask=t_ok, other=0.0)
        return left, sl, tl.load(A_ptr + c * N + n, mask=n < N, other=0.0)

    @triton.jit
    def _far_gap(c, I, J, L, sb_ptr, sref_ptr, Q: tl.constexpr):
        """The middle factor's exponent of far tile ``(I, J)`` of channel ``c`` before its rates: the sum from
        the column tile's reference to the row tile's start (float64 difference)."""
        n_tiles = (L + Q - 1) // Q
        return (tl.load(sb_ptr + c * (n_tiles + 1) + I) - tl.load(sref_ptr + c * n_tiles + J)).to(tl.float32)

    @triton.jit
    def _far_tile(u, u_hi, a, gap, linked, v, SPLIT: tl.constexpr):
        """A far tile from its factors: ``U · (V · diag(mid))ᵀ``, ``mid = e^{A gap}`` where ``linked``."""
        mid = _exp(a * gap) * linked  # (NP,), every exponent ≤ 0
        return _split_product(u, u_hi, v * mid[None, :], SPLIT)

    @triton.jit
    def _tf32_head(x):
        """``x`` rounded to a TF32 head, the nearest value with 10 mantissa bits (ties away from zero): half a
        TF32 unit added to its bits, then the low 13 masked (-8192 = 0xFFFFE000). Its remainder ``x − head``
        is at most 2⁻¹¹ of ``x``; cut rather than rounded, up to 2⁻¹⁰, and a product of depth 32 twice as far
        from a float64 one on the H200 (6.0e-7 against 2.8e-7; Mamba-2's means 2.05e-6 → 1.74e-6 of the norm
        at L = 512, the torch path 1.67e-6; run VV)."""
        return ((x.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def _product(x, y, SPLIT: tl.constexpr):
        """``x · yᵀ``: with ``SPLIT`` on the tensor cores to about float32 accuracy, each operand split into a
        TF32 head (:func:`_tf32_head`) and its remainder, three TF32 products (the remainders' product, at
        most 2⁻²² of the result, is left out; the tensor cores read the remainders' top 19 bits; Triton's own
        ``"tf32x3"`` faulted in these kernels, 3.6, H200); else in IEEE float32."""
        return _split_product(x, _tf32_head(x), y, SPLIT)

    @triton.jit
    def _split_product(x, x_hi, y, SPLIT: tl.constexpr):
        """:func:`_product` with the head of ``x`` given: split once where ``x`` takes several products."""
        if not SPLIT:
            return tl.dot(x, tl.trans(y), input_precision="ieee")
        y_hi = _tf32_head(y)
        acc = tl.dot(x_hi, tl.trans(y_hi), input_precision="tf32")
        acc += tl.dot(x_hi, tl.trans(y - y_hi), input_precision="tf32")
        return acc + tl.dot(x - x_hi, tl.trans(y_hi), input_precision="tf32")

    @triton.jit
    def _outer(c, I, J, L, u, u_hi, sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, seg_ptr, segref_ptr,
               N: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr, FAR_DOT: tl.constexpr,
               SPLIT: tl.constexpr):  # fmt: skip
        """A far tile (``I ≥ J + 2``) of channel ``c``: ``U · (V · diag(mid))ᵀ`` (the left factors and the
        input mask ride in ``U``, :func:`_far_rows`, and ``V``, :func:`_prep_kernel`). The middle factor goes
        on ``V``, so that ``U`` and its TF32 head ``u_hi`` are the same for every tile of the row: 1.9 % less
        far-kernel time at L = 512 (run QQ), since ``U`` is split once per row tile, not once a tile."""
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        t_ok = t < L
        j_ok = j < L
        gap = _far_gap(c, I, J, L, sb_ptr, sref_ptr, Q)
        # one segment from the column tile's reference to the row tile's start (U and V check the ends): in
        # the middle factor, not an entry at a time
        linked = (tl.load(seg_ptr + I * Q - 1) == tl.load(segref_ptr + J)).to(tl.float32)
        if FAR_DOT:
            n = tl.arange(0, NP)
            v = tl.load(V_ptr + (c * L + j[:, None]) * NP + n[None, :], mask=j_ok[:, None], other=0.0)
            a = tl.load(A_ptr + c * N + n, mask=n < N, other=0.0)
            acc = _far_tile(u, u_hi, a, gap, linked, v, SPLIT)
        else:
            acc = tl.zeros((Q, Q), dtype=tl.float32)
            for n in tl.static_range(N):
                mid_n = _exp(tl.load(A_ptr + c * N + n) * gap) * linked
                u_n = tl.load(U_ptr + (c * L + t) * NP + n, mask=t_ok, other=0.0)
                v_n = tl.load(V_ptr + (c * L + j) * NP + n, mask=j_ok, other=0.0)
                acc += (u_n * mid_n)[:, None] * v_n[None, :]
        return acc

    @triton.jit
    def _valid(t, m, L, seg_ptr):
        """Where rows ``t`` see columns through their last conv tap ``m``: ``m ≤ t``, both inside the
        sequence and in one segment."""
        seg_t = tl.load(seg_ptr + t, mask=t < L, other=0)
        seg_m = tl.load(seg_ptr + m, mask=m < L, other=-1)
        return _valid_in(t, m, L, seg_t, seg_m)

    @triton.jit
    def _valid_in(t, m, L, seg_t, seg_m):
        """:func:`_valid` from the segments of rows and columns as loaded there."""
        valid = (m[None, :] <= t[:, None]) & (m < L)[None, :] & (t < L)[:, None]
        return valid & (seg_t[:, None] == seg_m[None, :])

    @triton.jit
    def _gaps(c, I, t, j, L, sloc_ptr, tot_ptr, seg_ptr, K: tl.constexpr, Q: tl.constexpr):
        """Rows ``t`` of row tile ``I``, columns ``j`` of tile ``I`` or ``I − 1`` seen from their last conv
        tap ``m = j + K − 1``: where ``t ≥ m`` in one segment (``valid``), and ``S_{t+1} − S_{m+1}`` there
        (``gap``; sums local to each tile, float32 of small numbers, plus the carry of ``m``'s tile)."""
        m = j + (K - 1)
        t_ok = t < L
        m_ok = m < L
        valid = _valid(t, m, L, seg_ptr)
        n_tiles = (L + Q - 1) // Q
        tile_m = m // Q
        s_t = tl.load(sloc_ptr + c * L + t, mask=t_ok, other=0.0)
        s_m = tl.load(sloc_ptr + c * L + m, mask=m_ok, other=0.0)
        carry = tl.load(tot_ptr + c * n_tiles + tile_m, mask=m_ok & (tile_m < I), other=0.0)
        gap = tl.where(valid, tl.maximum(s_t[:, None] - (s_m - carry)[None, :], 0.0), 0.0)
        return valid, gap

    @triton.jit
    def _direct(c, I, t, j, L, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, N: tl.constexpr,
                K: tl.constexpr, Q: tl.constexpr):  # fmt: skip
        """``Σ_n C[t, n] · exp(A_n (S_{t+1} − S_{m+1})) · W[j, n]`` where valid (:func:`_gaps`): one
        exponential per entry and state. The state loop is not unrolled: unrolling hoists every state's
        loads and spills registers."""
        valid, gap = _gaps(c, I, t, j, L, sloc_ptr, tot_ptr, seg_ptr, K, Q)
        t_ok = t < L
        j_ok = (j >= 0) & (j < L)
        acc = tl.zeros((t.shape[0], j.shape[0]), dtype=tl.float32)
        for n in range(N):
            c_n = tl.load(C_ptr + n * L + t, mask=t_ok, other=0.0)
            w_n = tl.load(W_ptr + (c * N + n) * L + j, mask=j_ok, other=0.0)
            acc += c_n[:, None] * _exp(tl.load(A_ptr + c * N + n) * gap) * w_n[None, :]
        return tl.where(valid, acc, 0.0)

    @triton.jit
    def _clamped(t, j, L):
        """Rows and columns clamped into the sequence, for loads whose entries ``valid`` drops wherever they
        fall outside it: unmasked loads need no predicate and no zero set before each (two instructions a
        load, a state of a direct block issues three loads)."""
        return tl.minimum(tl.maximum(t, 0), L - 1), tl.minimum(tl.maximum(j, 0), L - 1)

    @triton.jit
    def _sides(c, t, j, L, left_ptr, pmask_ptr):
        """The left factors of rows ``t`` and the input mask of columns ``j``: loaded with a tile's first
        loads, so that a program waits for memory once, not again before it stores."""
        left = tl.load(left_ptr + c * L + t, mask=t < L, other=0.0)
        return left, tl.load(pmask_ptr + j, mask=(j >= 0) & (j < L), other=0.0)

    @triton.jit
    def _band(acc, c, t, j, L, fix_ptr, left, pm, K: tl.constexpr, BAND: tl.constexpr):
        """Applies the left factors and the input mask; with ``BAND``, first puts the ``K`` diagonals
        ``0 ≤ t − j < K`` in (``fix``, whole entries: the taps at or before ``t`` and the skip), a diagonal
        at a time from a vector of its rows' entries. Dense tiles leave them to :func:`_store_band`. (Gathered
        entry by entry, one masked load an entry, the band made the channel sums of near tiles spill 1.5 KB a
        thread at 4 warps, 924 bytes with ``|·|``: RG-LRU's signed near sums took twice its absolute ones.)"""
        if BAND:
            d = t[:, None] - j[None, :]  # j = t − d lies in the sequence wherever t does (j ≥ 0: J ≥ 0)
            for e in tl.static_range(K):
                fix_e = tl.load(fix_ptr + (c * L + t) * K + e, mask=t < L, other=0.0)
                acc = tl.where(d == e, fix_e[:, None], acc)
        return acc * left[:, None] * pm[None, :]

    @triton.jit
    def _band_entries(c, t, lo, hi, L, fix_ptr, left_ptr, pmask_ptr, K: tl.constexpr, KP: tl.constexpr):
        """The ``K`` diagonals ``0 ≤ t − d`` of rows ``t`` that lie in columns ``lo … hi − 1``: ``fix`` times
        the left factors and the input mask, ``(rows, KP)`` entries, their columns and where they are.
        Loaded before the tile is computed; :func:`_store_band` writes them after it."""
        d = tl.arange(0, KP)
        j = t[:, None] - d[None, :]
        t_ok = t < L
        on = (d < K)[None, :] & (j >= lo) & (j < hi) & (j >= 0) & t_ok[:, None]
        band = tl.load(fix_ptr + (c * L + t)[:, None] * K + d[None, :], mask=on, other=0.0)
        band = band * tl.load(left_ptr + c * L + t, mask=t_ok, other=0.0)[:, None]
        return band * tl.load(pmask_ptr + j, mask=on, other=0.0), j, on

    @triton.jit
    def _store_band(out_ptr, slab, stride_slab, stride_t, t, j, on, band, r0, r1, c0, c1, keep):
        """Stores the band entries of :func:`_band_entries` over what this program's tile store wrote
        there: after a barrier, so that they land last."""
        rows = (t - r0).to(tl.int64) * stride_t + slab.to(tl.int64) * stride_slab
        inside = on & ((t >= r0) & (t < r1))[:, None] & (j >= c0) & (j < c1)
        inside = tl.where(keep, inside, False)
        tl.debug_barrier()  # the tile's own store of these entries comes first
        tl.store(out_ptr + rows[:, None] + (j - c0), band, mask=inside)

    @triton.jit
    def _near(
        c, I, J, L, ssm, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, fix_ptr, seg_ptr, left_ptr, pmask_ptr,
        N: tl.constexpr, K: tl.constexpr, Q: tl.constexpr, SCALAR: tl.constexpr, BAND: tl.constexpr,
    ):  # fmt: skip
        """A near tile (``I ∈ {J, J + 1}``) of channel ``c``, every entry directly.

        Column ``j`` is taken from its last conv tap ``m = j + K − 1``: where ``t ≥ m`` every tap is
        causal and ``A[t, j] = Σ_n C[t, n] · exp(A_n (S_{t+1} − S_{m+1})) · W[j, n]`` with ``W`` the conv
        folded into the input side (``DiagonalTiles``), one exponential per entry and state and no halo;
        the ``K`` diagonals from ``t = j`` are ``fix`` (partial taps and the skip): put in with ``BAND``,
        else stored over the tile (:func:`_store_band`)."""
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        left, pm = _sides(c, t, j, L, left_ptr, pmask_ptr)
        acc = tl.zeros((Q, Q), dtype=tl.float32)
        if ssm != 0:
            if SCALAR:  # one rate for every state (Mamba-2): one exponential per entry, C_t · W_j a product
                valid, gap = _gaps(c, I, t, j, L, sloc_ptr, tot_ptr, seg_ptr, K, Q)
                n = tl.arange(0, N)
                c_rows = tl.load(C_ptr + n[None, :] * L + t[:, None], mask=(t < L)[:, None], other=0.0)
                j_ok = (j >= 0) & (j < L)
                w_rows = tl.load(W_ptr + (c * N + n[None, :]) * L + j[:, None], mask=j_ok[:, None], other=0.0)
                acc = tl.dot(c_rows, tl.trans(w_rows), input_precision="ieee")
                acc = tl.where(valid, acc * _exp(tl.load(A_ptr + c * N) * gap), 0.0)
            else:
                acc = _direct(c, I, t, j, L, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, N, K, Q)
        return _band(acc, c, t, j, L, fix_ptr, left, pm, K, BAND)

    @triton.jit
    def _strip_at(I, i, J, Q: tl.constexpr, SQ: tl.constexpr):
        """Strip ``i`` of near tile ``(I, J)``: its first row ``R``, its rows, the tile's columns and the
        columns of its diagonal block."""
        R = I * Q + i * SQ
        return R, R + tl.arange(0, SQ), J * Q + tl.arange(0, Q), R + tl.arange(0, SQ)

    @triton.jit
    def _block_term(acc, c, n, t, j, gap, L, A_ptr, C_ptr, W_ptr, N: tl.constexpr):
        """``acc`` plus state ``n``'s terms ``C[t, n] · 2^{A_n gap} · W[j, n]`` (``gap`` pre-scaled by
        ``log₂e``; rows and columns clamped into the sequence, as broadcast as ``acc``): the direct blocks'
        sum, :func:`_diagonal_block`'s and :func:`_strip_blocks`'."""
        c_n = tl.load(C_ptr + n * L + t)
        w_n = tl.load(W_ptr + (c * N + n) * L + j)
        return acc + c_n * _exp2(tl.load(A_ptr + c * N + n) * gap) * w_n

    @triton.jit
    def _diagonal_block(c, I, t, j, L, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, N: tl.constexpr,
                        NP: tl.constexpr, K: tl.constexpr, Q: tl.constexpr):  # fmt: skip
        """:func:`_direct` for an ``SQ × SQ`` block of a strip, the state loop unrolled (up to 32 states): two
        entries a thread and state, so every state's loads go out at once and fit in registers, where
        :func:`_direct`'s loop waits for each state's loads in turn. The same sums, term by term. (Every
        state at once, ``SQ × SQ × NP`` terms summed in registers from rows loaded whole, compiles to three
        times the instructions: the sum crosses lanes.)"""
        if N > 32:
            return _direct(c, I, t, j, L, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, N, K, Q)
        valid, gap = _gaps(c, I, t, j, L, sloc_ptr, tot_ptr, seg_ptr, K, Q)
        gap = gap * LOG2E
        t_in, j_in = _clamped(t, j, L)
        acc = tl.zeros((t.shape[0], j.shape[0]), dtype=tl.float32)
        for n in tl.static_range(N):
            acc = _block_term(acc, c, n, t_in[:, None], j_in[None, :], gap, L, A_ptr, C_ptr, W_ptr, N)
        return tl.where(valid, acc, 0.0)

    @triton.jit
    def _strip_loads(c, I, i, J, L, R, t, j, jd, sloc_ptr, tot_ptr, growth_ptr, A_ptr, W_ptr, fix_ptr,
                     left_ptr, pmask_ptr, rw_ptr, cw_ptr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
                     KP: tl.constexpr, Q: tl.constexpr, SQ: tl.constexpr):  # fmt: skip
        """Channel ``c``'s factors of row strip ``i`` of near tile ``(I, J)`` as loaded (:func:`_strip_sums`):
        the strip's growth, the rates, ``S_R − S_IQ``, the rows' sums ``S_{t+1} − S_R``, the columns' sums
        and ``W`` (:func:`_column_side`), the band ``fix`` as ``(rows, KP)``, the left factors and the row and
        column weights (of ``main``'s columns and of ``diag``'s)."""
        n = tl.arange(0, NP)
        t_ok = t < L
        # strips past the sequence (rows cut by L) have no growth: read none
        growth = tl.load(growth_ptr + (c * ((L + SQ - 1) // SQ) + R // SQ) * 2, mask=R < L, other=0.0)
        a = tl.load(A_ptr + c * N + n, mask=n < N, other=0.0)
        # S_R − S_IQ (0 for the tile's first strip); the index is clamped, its value unused then
        off = tl.load(sloc_ptr + c * L + tl.minimum(tl.maximum(R - 1, 0), L - 1))
        off = tl.where(i > 0, off, 0.0)
        row_gap = tl.load(sloc_ptr + c * L + t, mask=t_ok, other=0.0) - off  # S_{t+1} − S_R ≥ 0
        _, _, s_m, w, _ = _column_side(c, I, J, L, sloc_ptr, tot_ptr, W_ptr, pmask_ptr, N, NP, K, Q, Q)
        e = tl.arange(0, KP)
        fix = tl.load(fix_ptr + (c * L + t)[:, None] * K + e[None, :], mask=t_ok[:, None] & (e < K)[None, :],
                      other=0.0)  # fmt: skip
        left = tl.load(left_ptr + c * L + t, mask=t_ok, other=0.0)
        rw = _weight(rw_ptr, c * L + t, t_ok)
        cw = _weight(cw_ptr, c * L + j, (j >= 0) & (j < L))
        cw_diag = _weight(cw_ptr, c * L + jd, jd < L)
        return growth, a, off, row_gap, s_m, w, fix, left, rw, cw, cw_diag

    @triton.jit
    def _strip_sums(
        main, diag, c, c_end, I, i, J, L, ssm, max_growth, sloc_ptr, tot_ptr, growth_ptr, A_ptr, C_ptr, W_ptr,
        fix_ptr, seg_ptr, left_ptr, pmask_ptr, rw_ptr, cw_ptr, N: tl.constexpr, NP: tl.constexpr,
        K: tl.constexpr, KP: tl.constexpr, Q: tl.constexpr, SQ: tl.constexpr, SPLIT: tl.constexpr,
        TRANSFORM: tl.constexpr,
    ):  # fmt: skip
        """``main`` and ``diag`` plus the (weighted, transformed) row strip ``i`` (``SQ`` rows from ``R = IQ +
        i·SQ``) of near tile ``(I, J)`` of channels ``c … c_end − 1``, the band in registers, in two parts:
        ``main``, the columns ``j < R``, and ``diag``, the ``SQ`` columns from ``R`` (``J = I``). What the
        channels share (the rows of ``C``, where entries are valid, the input mask) is loaded once, each
        channel's factors a channel ahead of their use (:func:`_strip_loads`), as RG-LRU's near sums
        (:func:`_near_one_sums`).

        ``main`` factorises through ``S_R``: ``Σ_n C[t, n] e^{A_n (S_{t+1} − S_R)} · e^{A_n (S_R − S_{m+1})}
        W[j, n]``, one ``SQ × NP × Q`` product and ``(SQ + Q)·NP`` exponentials instead of ``SQ·Q·N``. The
        row factors are ``≤ 1``; a column's last tap lies at most ``K − 1`` positions past ``R``, so its
        factor grows by at most ``e^{max|A| (S_{R+K−1} − S_R)}``: strips where that passes
        ``e^{max_growth}`` (large rates) take every entry directly, as ``diag`` does
        (:func:`_diagonal_block`, which loads its own factors). Dense reads go by whole tiles instead
        (:func:`_strip_tiles`)."""
        R, t, j, jd = _strip_at(I, i, J, Q, SQ)
        n = tl.arange(0, NP)
        t_ok = t < L
        c_rows = tl.load(C_ptr + n[None, :] * L + t[:, None], mask=t_ok[:, None] & (n < N)[None, :],
                         other=0.0)  # fmt: skip
        m = j + (K - 1)
        valid = _valid(t, m, L, seg_ptr)
        cols = (j >= 0) & (j < R) & (j < L)
        pm = tl.load(pmask_ptr + j, mask=(j >= 0) & (j < L), other=0.0)
        pm_diag = tl.load(pmask_ptr + jd, mask=jd < L, other=0.0)
        d_main = t[:, None] - j[None, :]  # j = t − d lies in the sequence wherever t does (j ≥ 0: J ≥ 0)
        d_diag = t[:, None] - jd[None, :]
        e = tl.arange(0, KP)
        growth, a, off, row_gap, s_m, w, fix, left, rw, cw, cw_diag = _strip_loads(
            c, I, i, J, L, R, t, j, jd, sloc_ptr, tot_ptr, growth_ptr, A_ptr, W_ptr, fix_ptr, left_ptr,
            pmask_ptr, rw_ptr, cw_ptr, N, NP, K, KP, Q, SQ,
        )  # fmt: skip
        while c < c_end:
            n_growth, n_a, n_off, n_row_gap, n_s_m, n_w, n_fix, n_left, n_rw, n_cw, n_cw_diag = _strip_loads(
                tl.minimum(c + 1, c_end - 1), I, i, J, L, R, t, j, jd, sloc_ptr, tot_ptr, growth_ptr, A_ptr,
                W_ptr, fix_ptr, left_ptr, pmask_ptr, rw_ptr, cw_ptr, N, NP, K, KP, Q, SQ,
            )  # fmt: skip
            main_c = tl.zeros((SQ, Q), dtype=tl.float32)
            diag_c = tl.zeros((SQ, SQ), dtype=tl.float32)
            if ssm != 0:
                if J == I:
                    diag_c = _diagonal_block(c, I, t, jd, L, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, seg_ptr,
                                             N, NP, K, Q)  # fmt: skip
                if growth <= max_growth:
                    # rows past the sequence: a gap of 0 (their sums, masked to 0, less off would overflow)
                    u = c_rows * _exp(a[None, :] * tl.where(t_ok, row_gap, 0.0)[:, None])
                    col_gap = tl.where(cols, off - s_m, 0.0)  # S_R − S_{m+1} ≥ −(S_{R+K−1} − S_R)
                    w_c = tl.where(cols[:, None], w * _exp(a[None, :] * col_gap[:, None]), 0.0)
                    main_c = tl.where(valid, _product(u, w_c, SPLIT), 0.0)
                else:
                    main_c = _direct(c, I, t, j, L, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, N, K, Q)
            main_c = _band_rows(main_c, d_main, e, fix, K) * left[:, None] * pm[None, :]
            main_c = tl.where((j < R)[None, :], main_c, 0.0)  # diag's columns and the zeros past them
            diag_c = _band_rows(diag_c, d_diag, e, fix, K) * left[:, None] * pm_diag[None, :]
            main = _reduce_with(main, main_c, rw, cw, TRANSFORM)
            diag = _reduce_with(diag, diag_c, rw, cw_diag, TRANSFORM)
            growth, a, off, row_gap, s_m, w, fix, left, rw, cw, cw_diag = (
                n_growth, n_a, n_off, n_row_gap, n_s_m, n_w, n_fix, n_left, n_rw, n_cw, n_cw_diag
            )  # fmt: skip
            c += 1
        return main, diag

    @triton.jit
    def _store_at(out_ptr, slab, stride_slab, stride_t, t, j, r0, r1, c0, c1, acc, keep,
                  ALIGNED: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
        """Entries ``(t, j)`` of ``acc`` that lie in the read ``[r0:r1, c0:c1]`` and in ``keep`` (a scalar
        or a mask that broadcasts), into slab ``slab`` of the output.

        ``ALIGNED`` (:func:`_aligned`: 0, or a run of 4 or 16 entries; ``c0``, ``c1`` and the output's
        strides are multiples of 16, and every ``j`` here is a run of columns from a multiple of 16) lets
        the compiler store 16 bytes at a time: a quarter of the store instructions and of their masks, in
        kernels whose issue rate, more than the memory, sets their time. The run it is told caps the
        vectors: 16 lets bfloat16 go 8 entries a store, where a kernel whose entries sit 4 to a thread
        would first reshuffle every tile through shared memory (the by-head kernel: 4). ``EVICT``: the
        stores' L2 eviction policy (:data:`EVICTIONS`)."""
        rows = (t - r0).to(tl.int64) * stride_t + slab.to(tl.int64) * stride_slab  # past 2^31 entries
        cols = j - c0
        cols_in = (j >= c0) & (j < c1)
        if ALIGNED:
            rows = tl.multiple_of(rows, ALIGNED)
            cols = tl.multiple_of(cols, ALIGNED)
            cols_in = tl.max_constancy(cols_in, ALIGNED)
        inside = ((t >= r0) & (t < r1))[:, None] & cols_in[None, :]
        inside = tl.where(keep, inside, False)  # a scalar condition: where(), not &, for every Triton
        if EVICT == 1:  # (an integer: a defaulted string constexpr here failed to compile in Triton 3.6)
            tl.store(out_ptr + rows[:, None] + cols[None, :], acc, mask=inside, eviction_policy="evict_first")
        else:
            tl.store(out_ptr + rows[:, None] + cols[None, :], acc, mask=inside)

    @triton.jit
    def _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, acc, Q: tl.constexpr, keep,
               ALIGNED: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        _store_at(out_ptr, slab, stride_slab, stride_t, t, j, r0, r1, c0, c1, acc, keep, ALIGNED, EVICT)

    @triton.jit
    def _weight(w_ptr, offsets, mask):
        """A channel sum's row or column weights at ``offsets`` (0 where not ``mask``); where the read weighs
        nothing (``w_ptr`` None, a compile-time constant: its own compiled variant) ones, with no load, whose
        products the compiler drops. Where a mask is false, the factor the weight multiplies is zero (the
        products' operands) or the entry is never stored (rows and columns past ``L``), so the sums are those
        a tensor of ones gave: the same bits but RWKV-4's signed ones (2e-9 of their norm: a product now
        fused with its sum). Mamba-2's `|·|` channel loop: 262 → 179 SASS and 18 → 10 global loads a channel
        at 8 warps (``kernel_registers.py``); unweighted means 3–25 % faster (run VV)."""
        if w_ptr is None:
            w = tl.full(offsets.shape, 1.0, tl.float32)
        else:
            w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
        return w

    @triton.jit
    def _reduce_at(total, acc, c, t, j, L, rw_ptr, cw_ptr, TRANSFORM: tl.constexpr):
        rw = _weight(rw_ptr, c * L + t, t < L)
        return _reduce_with(total, acc, rw, _weight(cw_ptr, c * L + j, (j >= 0) & (j < L)), TRANSFORM)

    @triton.jit
    def _reduce_with(total, acc, rw, cw, TRANSFORM: tl.constexpr):
        """``total`` plus ``acc`` weighted by rows ``rw`` and columns ``cw``, then transformed."""
        acc = acc * rw[:, None]
        acc = acc * cw[None, :]
        if TRANSFORM == 1:
            acc = tl.abs(acc)
        elif TRANSFORM == 2:
            acc = tl.maximum(acc, 0.0)
        return total + acc

    @triton.jit
    def _reduce_step(total, acc, c, I, J, L, rw_ptr, cw_ptr, TRANSFORM: tl.constexpr, Q: tl.constexpr):
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        return _reduce_at(total, acc, c, t, j, L, rw_ptr, cw_ptr, TRANSFORM)

    # lengths and offsets change with every read: one compiled kernel for all of them
    _SPAN = ["stride_slab", "stride_t", "r0", "r1", "c0", "c1", "I0", "L"]
    UNSPECIALISED = {
        "_prep_kernel": ["L", "ssm", "skip", "has_right", "has_segments"],
        "_far_kernel": _SPAN + ["J0", "nJ", "span", "ssm", "n_chan", "per_group", "max_growth", "near_far"],
        "_near_kernel": _SPAN + ["ssm", "n_chan", "per_group"],
        "_near_sum_kernel": _SPAN[:-1] + ["parts"],
        "_strip_kernel": _SPAN + ["ssm", "n_chan", "per_group", "max_growth"],
        "_wkv_kernel": _SPAN + ["J0", "nJ", "span", "n_chan", "per_group", "left_stride", "right_stride"],
        "_head_kernel": _SPAN + ["J0", "nI", "nJ", "ssm", "n_heads", "K", "skip"],
        "_head_reduce_kernel": _SPAN + ["J0", "nI", "nJ", "ssm", "n_heads", "per_group", "K", "skip"],
    }

    @triton.jit
    def _right(c, m, L, r_ptr, has_right):
        """``r_m``: channel ``c``'s right factors at positions ``m`` (1 without ``has_right``)."""
        return tl.load(r_ptr + c * L + m, mask=m < L * has_right, other=1.0)

    @triton.jit
    def _input_weight(c, m, L, m_ok, u_ptr, r_ptr, has_right):
        """``u_m r_m``: the input weight times the right factors."""
        return tl.load(u_ptr + c * L + m, mask=m_ok, other=0.0) * _right(c, m, L, r_ptr, has_right)

    @triton.jit(do_not_specialize=UNSPECIALISED["_prep_kernel"])
    def _prep_kernel(
        S_ptr, A_ptr, B_ptr, C_ptr, u_ptr, r_ptr, D_ptr, taps_ptr, seg_ptr, segref_ptr, left_ptr, pmask_ptr,
        sloc_ptr, sb_ptr, tot_ptr, sref_ptr, growth_ptr, U_ptr, V_ptr, W_ptr, Ct_ptr, fix_ptr,
        L, ssm, skip, has_right, has_segments,
        N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, Q: tl.constexpr,
        P: tl.constexpr, SQ: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        """What :class:`DiagonalTiles` prepares, for channel ``c`` and ``P`` positions ``p``, in one pass
        (``2K − 1`` exponentials per position and state, ``2K`` with ``ROWS``: a tap's gap to itself is 0
        and takes none), from ``S``, the rates and the factors as given:

        * the sums of ``S`` that the tiles read: ``sloc[p] = S_{p+1} − S_{start}`` (the tile's start), each
          tile's bounds ``sb``, total ``tot`` and far reference ``sref``, each strip's ``growth``
          ``max_n |A_n| (S_{R+K−1} − S_R)`` and that of its diagonal block,
          ``max_n |A_n| (S_{R+SQ+K−1} − S_R)``, and (with resets) each tile's reference segment ``seg_ref``,
          written by the lane of the tile's or strip's first position;
        * ``W[p, n] = Σ_k w_k exp(A_n (S_{l+1} − S_{p+k+1})) u_{p+k} r_{p+k} B[p+k, n]`` with ``l`` the last
          tap ``min(p + K − 1, L − 1)``, over the taps inside the sequence and in ``l``'s segment;
        * ``V[p, n] = p_p exp(A_n (S_ref − S_{l+1})) W[p, n]``, zero past a reset before the tile's
          reference: the input mask ``p`` rides in the far tiles' column operand, as the left factors ride in
          their row operand ``U`` (:func:`_far_rows`; two multiplies an entry of every far tile fewer, a
          fifth of what its loop issues); ``C`` state-major for the tiles (``Ct``, by channel 0); with
          ``ROWS`` (the far tiles' outer products, ``N < 16``) ``U`` too, as :func:`_far_rows` computes it;
        * ``fix[p, d]`` (``d < K``), entry ``(p, p − d)`` of the band whole:
          ``Σ_{e ≤ d} w_{d−e} core[p, p − e]`` and the skip ``w_d D r_p`` (the near tiles' formula holds
          only its last diagonal, ``d = K − 1``).

        ``r`` is read only with ``has_right`` (else 1), ``D`` only with ``skip``. Every exponent is ≤ 0
        (float64 differences of ``S``, rounded after)."""
        c = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * P + tl.arange(0, P)
        p_ok = p < L
        n = tl.arange(0, NP)
        n_ok = n < N
        pn_ok = p_ok[:, None] & n_ok[None, :]
        n_tiles = (L + Q - 1) // Q
        S_row = S_ptr + c * (L + 1)
        # the sums of S: float64 differences, rounded after
        S_p = tl.load(S_row + p + 1, mask=p_ok, other=0.0)
        start = p // Q * Q
        tile = p // Q
        S_start = tl.load(S_row + start, mask=p_ok, other=0.0)
        sl = (S_p - S_start).to(tl.float32)  # Σ over the tile, through p
        tl.store(sloc_ptr + c * L + p, sl, mask=p_ok)
        first = p_ok & (p % Q == 0)  # each tile's first position writes the tile's sums
        S_end = tl.load(S_row + tl.minimum(start + Q, L), mask=first, other=0.0)
        tl.store(sb_ptr + c * (n_tiles + 1) + tile, S_start, mask=first)
        tl.store(sb_ptr + c * (n_tiles + 1) + n_tiles + 0 * p, S_p, mask=p == L - 1)  # S_L: the last bound
        tl.store(tot_ptr + c * n_tiles + tile, (S_end - S_start).to(tl.float32), mask=first)
        ref = tl.minimum((tile + 1) * Q + K - 1, L)  # the far tiles' column reference
        S_ref = tl.load(S_row + ref, mask=p_ok, other=0.0)
        tl.store(sref_ptr + c * n_tiles + tile, S_ref, mask=first)
        seg_ref = tl.load(seg_ptr + ref - 1, mask=p_ok, other=0)  # the segment of the tile's last column
        # one channel writes the segments' references, only where there are resets (else a shared zero)
        tl.store(segref_ptr + tile, seg_ref, mask=tl.where(c == 0, first & (p < L * has_segments), False))
        seg_p = tl.load(seg_ptr + p, mask=p_ok, other=0)
        d = tl.arange(0, KP)
        fix = tl.zeros((P, KP), dtype=tl.float32)
        if ssm != 0:
            a = tl.load(A_ptr + c * N + n, mask=n_ok, other=0.0)
            # each strip's growths, from the lane of its first row R: max_n |A_n| (S_{R+K−1} − S_R) and
            # max_n |A_n| (S_{R+SQ+K−1} − S_R)
            strip = p_ok & (p % SQ == 0)
            S_R = tl.load(S_row + p, mask=strip, other=0.0)
            span = tl.load(S_row + tl.minimum(p + K - 1, L), mask=strip, other=0.0) - S_R
            span_diag = tl.load(S_row + tl.minimum(p + SQ + K - 1, L), mask=strip, other=0.0) - S_R
            at = growth_ptr + (c * ((L + SQ - 1) // SQ) + p // SQ) * 2
            tl.store(at, tl.max(tl.abs(a), axis=0) * span.to(tl.float32), mask=strip)
            tl.store(at + 1, tl.max(tl.abs(a), axis=0) * span_diag.to(tl.float32), mask=strip)
            last = tl.minimum(p + K - 1, L - 1)
            S_last = tl.load(S_row + last + 1, mask=p_ok, other=0.0)
            seg_last = tl.load(seg_ptr + last, mask=p_ok, other=0)
            W = tl.zeros((P, NP), dtype=tl.float32)
            for k in tl.static_range(K):
                m = tl.minimum(p + k, L - 1)
                inside = p_ok & (p + k < L) & (tl.load(seg_ptr + m, mask=p_ok, other=0) == seg_last)
                gap = tl.maximum(S_last - tl.load(S_row + m + 1, mask=p_ok, other=0.0), 0.0).to(tl.float32)
                tap = tl.load(taps_ptr + c * K + K - 1 - k)
                weight = _input_weight(c, m, L, p_ok, u_ptr, r_ptr, has_right) * tap
                b = tl.load(B_ptr + m[:, None] * N + n[None, :], mask=pn_ok, other=0.0)
                term = tl.where(inside, weight, 0.0)[:, None] * b
                if k == K - 1:  # the last tap itself (m = l): a gap of 0, the term as it is
                    W += term
                else:
                    W += _exp(a[None, :] * gap[:, None]) * term
            rows = c * L + p
            tl.store(W_ptr + (c * N + n[None, :]) * L + p[:, None], W, mask=pn_ok)  # state-major
            c_rows = tl.load(C_ptr + p[:, None] * N + n[None, :], mask=pn_ok, other=0.0)
            # C state-major for the tiles, by one channel: a state's entries of consecutive rows in a run
            tl.store(Ct_ptr + n[None, :] * L + p[:, None], c_rows, mask=tl.where(c == 0, pn_ok, False))
            if ROWS:
                before = tl.load(seg_ptr + tl.maximum(start - 1, 0), mask=p_ok, other=0)
                left = tl.where(seg_p == before, tl.load(left_ptr + rows, mask=p_ok, other=0.0), 0.0)
                U = _row_factors(c_rows, a, sl, left)
                tl.store(U_ptr + rows[:, None] * NP + n[None, :], U, mask=p_ok[:, None])
            gap = tl.maximum(S_ref - S_last, 0.0).to(tl.float32)
            right = tl.where(seg_last == seg_ref, tl.load(pmask_ptr + p, mask=p_ok, other=0.0), 0.0)
            V = _exp(a[None, :] * gap[:, None]) * W * right[:, None]
            tl.store(V_ptr + rows[:, None] * NP + n[None, :], V, mask=p_ok[:, None])
            for e in tl.static_range(K):  # the recurrence's entries core[p, p − e]
                m = tl.maximum(p - e, 0)
                linked = p_ok & (p >= e) & (tl.load(seg_ptr + m, mask=p_ok, other=0) == seg_p)
                gap = tl.maximum(S_p - tl.load(S_row + m + 1, mask=p_ok, other=0.0), 0.0).to(tl.float32)
                b = tl.load(B_ptr + m[:, None] * N + n[None, :], mask=pn_ok, other=0.0)
                if e == 0:  # the diagonal: a gap of 0
                    entry = tl.sum(c_rows * b, axis=1)
                else:
                    entry = tl.sum(_exp(a[None, :] * gap[:, None]) * c_rows * b, axis=1)
                entry = tl.where(linked, entry * _input_weight(c, m, L, p_ok, u_ptr, r_ptr, has_right), 0.0)
                # column p − d takes it through tap d − e, for e ≤ d < K
                on = (d >= e) & (d < K)
                coef = tl.load(taps_ptr + c * K + tl.where(on, K - 1 - (d - e), 0), mask=on, other=0.0)
                fix += entry[:, None] * coef[None, :]
        if skip != 0:
            coef = tl.load(taps_ptr + c * K + tl.where(d < K, K - 1 - d, 0), mask=d < K, other=0.0)
            fix += (tl.load(D_ptr + c) * _right(c, p, L, r_ptr, has_right))[:, None] * coef[None, :]
        tl.store(fix_ptr + (c * L + p)[:, None] * K + d[None, :], fix, mask=p_ok[:, None] & (d < K)[None, :])

    @triton.jit
    def _far_channel_loads(c, I, J, L, ssm, t, same, sb_ptr, sref_ptr, A_ptr, V_ptr, sloc_ptr, left_ptr,
                           N: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr):  # fmt: skip
        """Channel ``c``'s factors of far tile ``(I, J)`` as loaded (:func:`_far_sums`): its row factors' part
        (:func:`_far_channel_rows`), its middle factor's exponent and its column factors ``V``."""
        left, sl, a = _far_channel_rows(c, t, L, ssm, same, A_ptr, sloc_ptr, left_ptr, N, NP)
        j = J * Q + tl.arange(0, Q)
        n = tl.arange(0, NP)
        v = tl.load(V_ptr + (c * L + j[:, None]) * NP + n[None, :], mask=(j < L)[:, None], other=0.0)
        return left, sl, a, _far_gap(c, I, J, L, sb_ptr, sref_ptr, Q), v

    @triton.jit
    def _far_sums(total, I, J, L, ssm, t, c_rows, same, c, c_end, sb_ptr, sref_ptr, A_ptr, V_ptr, seg_ptr,
                  segref_ptr, sloc_ptr, left_ptr, rw_ptr, cw_ptr, N: tl.constexpr, NP: tl.constexpr,
                  Q: tl.constexpr, SPLIT: tl.constexpr, TRANSFORM: tl.constexpr):  # fmt: skip
        """``total`` plus the (weighted, transformed) far tile ``(I, J)`` of channels ``c … c_end − 1``, as
        :func:`_far_rows` and :func:`_outer` compute each, from the rows of ``C`` loaded once: each channel's
        factors loaded a channel ahead of their use (where loaded, its exponentials waited for them)."""
        j = J * Q + tl.arange(0, Q)
        # one segment from the column tile's reference to the row tile's start (U and V check the ends)
        linked = (tl.load(seg_ptr + I * Q - 1) == tl.load(segref_ptr + J)).to(tl.float32)
        left, sl, a, gap, v = _far_channel_loads(c, I, J, L, ssm, t, same, sb_ptr, sref_ptr, A_ptr, V_ptr,
                                                 sloc_ptr, left_ptr, N, NP, Q)  # fmt: skip
        while c < c_end:
            n_left, n_sl, n_a, n_gap, n_v = _far_channel_loads(
                tl.minimum(c + 1, c_end - 1), I, J, L, ssm, t, same, sb_ptr, sref_ptr, A_ptr, V_ptr, sloc_ptr,
                left_ptr, N, NP, Q,
            )  # fmt: skip
            u = _row_factors(c_rows, a, sl, left)
            acc = _far_tile(u, _tf32_head(u), a, gap, linked, v, SPLIT)
            total = _reduce_at(total, acc, c, t, j, L, rw_ptr, cw_ptr, TRANSFORM)
            left, sl, a, gap, v = n_left, n_sl, n_a, n_gap, n_v
            c += 1
        return total

    @triton.jit
    def _widen(x, Q: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr):
        """``(Q, CB)`` per channel to ``(Q, CB · NP)``, each channel's column repeated for its states."""
        return tl.reshape(tl.broadcast_to(x[:, :, None], (Q, CB, NP)), (Q, CB * NP))

    @triton.jit
    def _far_product_sums(total, I, J, L, t, same, c, c_end, sb_ptr, sref_ptr, A_ptr, V_ptr, Cr_ptr, seg_ptr,
                          segref_ptr, sloc_ptr, left_ptr, rw_ptr, cw_ptr, N: tl.constexpr, NP: tl.constexpr,
                          Q: tl.constexpr, CB: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
        """``total`` plus the signed sum of far tile ``(I, J)`` over channels ``c … c_end − 1``, weighted by
        rows and columns. Channel ``c``'s weighted tile is ``(rw_c U_c) (cw_c V_c diag(mid_c))ᵀ``
        (:func:`_far_sums`), so the sum is one product ``X Yᵀ`` whose depth is channels × states, taken
        ``CB`` channels at a time (column ``k`` of ``X`` and ``Y``: channel ``k // NP``, state ``k % NP``):
        one tensor-core product of depth ``CB · NP`` and no tile-sized weighting a channel, where
        :func:`_far_sums` takes a product of depth ``NP``, then weighs and adds the tile. Signed sums only:
        ``|Σ_n u v|`` does not factorise. Mamba-1 (1536 channels, run TT-3): far sums 0.67 → 0.60 ms at
        L = 1024, 10.3 → 8.4 ms at 4096, 164 → 128 ms at 16k (the loop: 179 SASS a channel against 371, split
        TF32 both)."""
        j = J * Q + tl.arange(0, Q)
        k = tl.arange(0, CB * NP)
        n = k % NP
        t_ok = t < L
        # the rows of C, the same for every block of channels (column k: state k % NP)
        c_rows = tl.load(Cr_ptr + t[:, None] * N + n[None, :], mask=t_ok[:, None] & (n < N)[None, :],
                         other=0.0)  # fmt: skip
        # one segment from the column tile's reference to the row tile's start (U and V check the ends)
        linked = (tl.load(seg_ptr + I * Q - 1) == tl.load(segref_ptr + J)).to(tl.float32)
        while c < c_end:
            cc = c + k // NP
            k_ok = (cc < c_end) & (n < N)
            cc = tl.minimum(cc, c_end - 1)
            a = tl.load(A_ptr + cc * N + n, mask=k_ok, other=0.0)
            b = c + tl.arange(0, CB)  # the block's channels, loaded once and widened to their states
            b_ok = b < c_end
            rows = b[None, :] * L + t[:, None]  # (Q, CB)
            r_ok = t_ok[:, None] & b_ok[None, :]
            sl = _widen(tl.load(sloc_ptr + rows, mask=r_ok, other=0.0), Q, CB, NP)
            g = tl.load(left_ptr + rows, mask=r_ok & same[:, None], other=0.0)  # zero past a reset
            g = _widen(g * _weight(rw_ptr, rows, r_ok), Q, CB, NP)
            x = c_rows * _exp(a[None, :] * sl) * g
            cols = b[None, :] * L + j[:, None]
            c_ok = (j < L)[:, None] & b_ok[None, :]
            mid = _exp(a * _far_gap(cc, I, J, L, sb_ptr, sref_ptr, Q)) * linked  # exponents ≤ 0
            vk = cc[None, :] * L + j[:, None]
            y = tl.load(V_ptr + vk * NP + n[None, :], mask=(j < L)[:, None] & k_ok[None, :], other=0.0)
            y = y * (_widen(_weight(cw_ptr, cols, c_ok), Q, CB, NP) * mid[None, :])
            total += _product(x, y, SPLIT)
            c += CB
        return total

    @triton.jit
    def _rank_one_sums(total, I, J, L, c, c_end, sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, seg_ptr, segref_ptr,
                       rw_ptr, cw_ptr, NP: tl.constexpr, Q: tl.constexpr, CB: tl.constexpr,
                       SPLIT: tl.constexpr, TRANSFORM: tl.constexpr):  # fmt: skip
        """``total`` plus the (weighted, transformed) far tile ``(I, J)`` of channels ``c … c_end − 1`` of
        one state (RG-LRU): channel ``c``'s tile is ``x_c y_cᵀ`` with ``x_c = U_c · mid_c · rw_c`` and
        ``y_c = V_c · cw_c`` (:func:`_outer`, :func:`_reduce_at`), so their sum is one product ``X Yᵀ``
        whose depth is the channels, ``CB`` at a time on the tensor cores, where :func:`_outer` took an
        outer product and a reduction step a channel. The transforms carry over: ``|x_t y_j| = |x_t|
        |y_j|``, and ``max(x_t y_j, 0)`` is the product of the positive parts plus that of the negative
        ones. RG-LRU's 2560 channels (run SS): far sums 0.241 → 0.036 ms at L = 512, 4.79 → 0.47 ms at
        2048, about 0.29 s → 30 ms at 16k."""
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        # one segment from the column tile's reference to the row tile's start (U and V check the ends)
        linked = (tl.load(seg_ptr + I * Q - 1) == tl.load(segref_ptr + J)).to(tl.float32)
        while c < c_end:
            cc = c + tl.arange(0, CB)
            c_ok = cc < c_end
            gap = _far_gap(tl.minimum(cc, c_end - 1), I, J, L, sb_ptr, sref_ptr, Q)
            mid = _exp(tl.load(A_ptr + cc, mask=c_ok, other=0.0) * gap) * linked  # (CB,), exponents ≤ 0
            rows = cc[None, :] * L + t[:, None]  # (Q, CB)
            cols = cc[None, :] * L + j[:, None]
            r_ok = (t < L)[:, None] & c_ok[None, :]
            k_ok = (j < L)[:, None] & c_ok[None, :]
            x = tl.load(U_ptr + rows * NP, mask=r_ok, other=0.0)
            x = x * _weight(rw_ptr, rows, r_ok) * mid[None, :]
            y = tl.load(V_ptr + cols * NP, mask=k_ok, other=0.0)
            y = y * _weight(cw_ptr, cols, k_ok)
            total = _rank_one_add(total, x, y, SPLIT, TRANSFORM)
            c += CB
        return total

    @triton.jit
    def _rank_one_add(total, x, y, SPLIT: tl.constexpr, TRANSFORM: tl.constexpr):
        """``total`` plus the transformed sum ``Σ_c f(x_c y_cᵀ)`` of rank-one tiles, as products over the
        channels (columns ``c`` of ``x`` and ``y``): ``|x_t y_j| = |x_t| |y_j|``, and ``max(x_t y_j, 0)`` is
        the product of the positive parts plus that of the negative ones."""
        if TRANSFORM == 1:
            total += _product(tl.abs(x), tl.abs(y), SPLIT)
        elif TRANSFORM == 2:
            total += _product(tl.maximum(x, 0.0), tl.maximum(y, 0.0), SPLIT)
            total += _product(tl.minimum(x, 0.0), tl.minimum(y, 0.0), SPLIT)
        else:
            total += _product(x, y, SPLIT)
        return total

    @triton.jit
    def _far_bound(I, near_far):
        """The column tiles the far product takes in row tile ``I`` are those before this one: every ``J ≤ I −
        2`` (two tiles below the diagonal), and ``I − 1`` with ``near_far`` (:func:`_far_kernel`)."""
        return I - 1 + near_far.to(tl.int32)

    @triton.jit
    def _is_far(I, J, near_far, ssm):
        """Whether the far product takes tile ``(I, J)`` (:func:`_far_bound`), where the block has a
        recurrence."""
        return (J < _far_bound(I, near_far)) & (ssm != 0)

    @triton.jit
    def _far_ahead_loads(c, I, J, J_end, L, ssm, near_far, sref_ptr, V_ptr, segref_ptr, NP: tl.constexpr,
                         Q: tl.constexpr):  # fmt: skip
        """What far tile ``(I, J)`` of channel ``c`` loads, none where it is not far: its reference sum, reset
        count and column factors ``V``."""
        far = _is_far(I, J, near_far, ssm) & (J < J_end)
        n_tiles = (L + Q - 1) // Q
        sref = tl.load(sref_ptr + c * n_tiles + J, mask=far, other=0.0)
        segref = tl.load(segref_ptr + J, mask=far, other=0)
        j = J * Q + tl.arange(0, Q)
        n = tl.arange(0, NP)
        v = tl.load(V_ptr + (c * L + j[:, None]) * NP + n[None, :], mask=tl.where(far, j < L, False)[:, None],
                    other=0.0)  # fmt: skip
        return far, sref, segref, v

    @triton.jit
    def _far_run(out_ptr, slab, stride_slab, stride_t, r0, r1, c0, c1, I, J, J_end, L, ssm, near_far, u, u_hi,
                 sb_ptr, sref_ptr, A_ptr, V_ptr, seg_ptr, segref_ptr, N: tl.constexpr, NP: tl.constexpr,
                 Q: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr, EVICT: tl.constexpr,
                 AHEAD: tl.constexpr):  # fmt: skip
        """Tiles ``J … J_end − 1`` of row tile ``I`` of a dense read of channel ``slab`` (:func:`_outer`'s far
        tiles): the far ones, which come first (``J ≤ I − 2``, and ``I − 1`` with ``near_far``), in a loop of
        their own, then the zeros above the diagonal; the near tiles are the strips' or the near kernel's.

        With no branch around the product, the compiler takes the row factors ``U`` (and their TF32 parts)
        into the tensor cores' operand layout once, before the loop: inside ``if far`` it staged them through
        shared memory at every tile (8 KB stored and loaded again a tile; the far loop 234 → 206 SASS, 8 → 5
        barriers, stored in bfloat16). With ``AHEAD`` each far tile's loads are issued a tile ahead: 2–5 %
        faster stored in bfloat16, 1–2 % slower in float32 (run XX)."""
        n = tl.arange(0, NP)
        a = tl.load(A_ptr + slab * N + n, mask=n < N, other=0.0)
        n_tiles = (L + Q - 1) // Q
        sb = tl.load(sb_ptr + slab * (n_tiles + 1) + I)
        seg_row = tl.load(seg_ptr + I * Q - 1, mask=I > 0, other=-1)
        far_end = tl.where(ssm != 0, tl.minimum(J_end, _far_bound(I, near_far)), J)  # far tiles: J < far_end
        if AHEAD:
            _, sref, segref, v = _far_ahead_loads(slab, I, J, far_end, L, ssm, near_far, sref_ptr, V_ptr,
                                                  segref_ptr, NP, Q)  # fmt: skip
        while J < far_end:
            if AHEAD:
                ahead = _far_ahead_loads(slab, I, J + 1, far_end, L, ssm, near_far, sref_ptr, V_ptr,
                                         segref_ptr, NP, Q)  # fmt: skip
            else:
                _, sref, segref, v = _far_ahead_loads(slab, I, J, far_end, L, ssm, near_far, sref_ptr, V_ptr,
                                                      segref_ptr, NP, Q)  # fmt: skip
            linked = (seg_row == segref).to(tl.float32)
            total = _far_tile(u, u_hi, a, (sb - sref).to(tl.float32), linked, v, SPLIT)
            _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, total, Q, True, ALIGNED, EVICT)
            if AHEAD:
                _, sref, segref, v = ahead
            J += 1
        J = tl.maximum(J, far_end)
        zeros = tl.zeros((Q, Q), dtype=tl.float32)
        while J < J_end:  # zeros above the diagonal (and below it without a recurrence), not the near tiles
            not_near = (I < J) | (I >= J + 2)
            _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, zeros, Q, not_near, ALIGNED,
                   EVICT)  # fmt: skip
            J += 1

    @triton.jit
    def _prefetch(at):
        """Every address of ``at`` (``int64``) asked into the SM's L1 (``prefetch.global.L1``): nothing waits
        for it and nothing is returned; a load of those lines later finds them there. A no-op in the
        interpreter."""
        if not _INTERPRETED:
            tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [at],
                                      dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip

    @triton.jit
    def _near_line(k, c, I, L, C_ptr, W_ptr, sloc_ptr, left_ptr, pmask_ptr, N: tl.constexpr,
                   NP: tl.constexpr, Q: tl.constexpr):  # fmt: skip
        """The address (``int64``) of each line ``k`` of :func:`_prefetch_near`'s list, in its order: the rows
        of ``C`` of tile ``I`` (``NP × Q / 32`` lines, a state's in a row), ``W`` of tiles ``I − 1`` and ``I``
        (``NP × 2Q / 32``), the local sums and the input mask of those two tiles (``2Q / 32`` each), the left
        factors of tile ``I`` (``Q / 32``). Every part starts at a multiple of ``2Q / 32`` lines (``NP``
        even), so ``k`` itself gives the line's place in its tile. Positions are clamped to the sequence,
        states to ``N``: lines past either repeat one that is there."""
        tl.static_assert(NP % 2 == 0, "the prefetch's list needs an even number of states")
        QL: tl.constexpr = Q // 32  # lines (of 32 float32 entries) a tile
        rows = tl.minimum(I * Q + (k % QL) * 32, L - 1)
        cols = tl.minimum(tl.maximum(I * Q - Q + (k % (2 * QL)) * 32, 0), L - 1)
        k_w = k - NP * QL  # the line's index in its part of the list
        k_s = k_w - NP * 2 * QL
        at = tl.where(k_s < 2 * QL, (sloc_ptr + c * L + cols).to(tl.int64),
                      tl.where(k_s < 4 * QL, (pmask_ptr + cols).to(tl.int64),
                               (left_ptr + c * L + rows).to(tl.int64)))  # fmt: skip
        w_at = W_ptr + (c * N + tl.minimum(k_w // (2 * QL), N - 1)) * L + cols
        at = tl.where(k_s < 0, w_at.to(tl.int64), at)
        at = tl.where(k_w < 0, (C_ptr + tl.minimum(k // QL, N - 1) * L + rows).to(tl.int64), at)
        return at

    @triton.jit
    def _prefetch_near(c, I, L, C_ptr, W_ptr, sloc_ptr, left_ptr, pmask_ptr, N: tl.constexpr,
                       NP: tl.constexpr, Q: tl.constexpr):  # fmt: skip
        """The 128-byte lines that row tile ``I``'s strips (:func:`_strip_tiles`) load, asked for when the
        program starts, so that they arrive while its far tiles run (:func:`_near_line` lists them). Each
        strip waited on those loads from the L2 (``ncu``: 35 % of the far kernel's samples wait on global
        loads, most of them in the strips). The lines are listed one a lane, 128 at a time (Mamba-1: 106
        lines, one prefetch a thread): one prefetch a list and a thread, each of a tensor of its own, had the
        threads repeat each other's (run DDD: the far kernel 1 % slower). Prefetched, Mamba-1's far kernel is
        2–4 % faster at L = 512 and 1–2 % at 1024 (runs CCC, DDD), the same bits."""
        TOTAL: tl.constexpr = 3 * NP * (Q // 32) + 5 * (Q // 32)
        LANES: tl.constexpr = 128
        for first in tl.static_range(0, TOTAL, LANES):
            k = tl.minimum(first + tl.arange(0, LANES), TOTAL - 1)
            _prefetch(_near_line(k, c, I, L, C_ptr, W_ptr, sloc_ptr, left_ptr, pmask_ptr, N, NP, Q))

    @triton.jit(do_not_specialize=UNSPECIALISED["_far_kernel"])
    def _far_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, J0, nJ, span, L, ssm, n_chan, per_group,
        sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, left_ptr, pmask_ptr, seg_ptr, segref_ptr, rw_ptr, cw_ptr,
        growth_ptr, max_growth, near_far, fix_ptr, sloc_ptr, tot_ptr, C_ptr, Cr_ptr, W_ptr,
        N: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr, FAR_DOT: tl.constexpr, SPLIT: tl.constexpr,
        K: tl.constexpr, KP: tl.constexpr, SQ: tl.constexpr, STRIPS: tl.constexpr, REDUCE: tl.constexpr,
        TRANSFORM: tl.constexpr, ALIGNED: tl.constexpr, CB: tl.constexpr, AHEAD: tl.constexpr = False,
        EVICT: tl.constexpr = 0, UNROLL: tl.constexpr = 1, PREFETCH: tl.constexpr = False,
    ):  # fmt: skip
        """Every tile but the near ones: far tiles computed, tiles above the diagonal zeros. One program per
        row tile, run of ``span`` column tiles and channel (dense: the row factors loaded once per run) or
        group of ``per_group`` channels (reduce: summed in the program).

        With ``STRIPS`` (dense reads of Mamba-1, one run of every column tile) the program also takes its
        row tile's near tiles, after the far ones (:func:`_strip_tiles`): one launch fewer per read. With
        ``near_far`` (no resets) the far product takes near tile ``J = I − 1`` of every channel whose first
        strip of row tile ``I`` grows by at most ``e^max_growth`` (:func:`_strip_sums`): its reference
        ``S_ref(J)`` lies ``K − 1`` positions past ``S_IQ``, so the middle factor grows by just that, and the
        entries the factorisation gets wrong (``t < j + K − 1``) are all on the band, stored over the tile
        last (:func:`_store_band`, with the band of tile ``I``). Dense reads of the split product with up to
        32 states (Mamba-1) take their far tiles in a loop of their own (:func:`_far_run`), there with
        ``AHEAD`` each far tile's loads issued a tile ahead; with ``PREFETCH`` (and ``STRIPS``) the strips'
        lines are asked into the L1 before the far tiles (:func:`_prefetch_near`)."""
        I = I0 + tl.program_id(0)
        J = J0 + tl.program_id(1) * span
        J_end = tl.minimum(J + span, J0 + nJ)
        slab = tl.program_id(2)
        # the row factors of a dense read (channel sums compute each channel's in the loop, from what the
        # channels share, loaded once)
        if REDUCE and FAR_DOT:
            c_rows, same = _far_row_parts(I, L, ssm, Cr_ptr, seg_ptr, N, NP, Q)
        else:
            u, u_hi = _far_rows(slab, I, L, ssm, A_ptr, Cr_ptr, sloc_ptr, left_ptr, seg_ptr, N, NP, Q,
                                FAR_DOT)  # fmt: skip
        t = I * Q + tl.arange(0, Q)
        near_far = (near_far != 0) & (ssm != 0) & (I > 0)
        if STRIPS:  # loaded with the row factors: the first strip's growth, the band of both near tiles
            first_strip = slab * ((L + SQ - 1) // SQ) + I * (Q // SQ)
            near_far = near_far & (tl.load(growth_ptr + first_strip * 2) <= max_growth)
            lo = I * Q - Q
            band, jb, on = _band_entries(slab, t, lo, I * Q + Q, L, fix_ptr, left_ptr, pmask_ptr, K, KP)
            if PREFETCH:
                _prefetch_near(slab, I, L, C_ptr, W_ptr, sloc_ptr, left_ptr, pmask_ptr, N, NP, Q)
        near_in = (I >= J) & (I - 1 < J_end)  # this run holds a near tile of the row tile
        # dense reads of split products of up to 32 states (wider row factors, or the FMA products' operands,
        # held in registers across the loop spill: Mamba-2 by channel 736 → 10064 bytes at 4 warps)
        if not REDUCE and FAR_DOT and SPLIT and NP <= 32:
            _far_run(out_ptr, slab, stride_slab, stride_t, r0, r1, c0, c1, I, J, J_end, L, ssm, near_far, u,
                     u_hi, sb_ptr, sref_ptr, A_ptr, V_ptr, seg_ptr, segref_ptr, N, NP, Q, SPLIT, ALIGNED,
                     EVICT, AHEAD)  # fmt: skip
            J = J_end
        while J < J_end:  # while: Triton's interpreter cannot range() over arguments
            far = _is_far(I, J, near_far, ssm)
            total = tl.zeros((Q, Q), dtype=tl.float32)
            if REDUCE and FAR_DOT and TRANSFORM == 0 and CB > 1:
                if far:
                    total = _far_product_sums(total, I, J, L, t, same, slab * per_group,
                                              tl.minimum((slab + 1) * per_group, n_chan), sb_ptr, sref_ptr,
                                              A_ptr, V_ptr, Cr_ptr, seg_ptr, segref_ptr, sloc_ptr, left_ptr,
                                              rw_ptr, cw_ptr, N, NP, Q, CB, SPLIT)  # fmt: skip
            elif REDUCE and FAR_DOT:
                if far:
                    total = _far_sums(total, I, J, L, ssm, t, c_rows, same, slab * per_group,
                                      tl.minimum((slab + 1) * per_group, n_chan), sb_ptr, sref_ptr, A_ptr,
                                      V_ptr, seg_ptr, segref_ptr, sloc_ptr, left_ptr, rw_ptr, cw_ptr, N, NP,
                                      Q, SPLIT, TRANSFORM)  # fmt: skip
            elif REDUCE and N == 1:
                if far:
                    c_end = tl.minimum((slab + 1) * per_group, n_chan)
                    total = _rank_one_sums(total, I, J, L, slab * per_group, c_end, sb_ptr, sref_ptr, A_ptr,
                                           U_ptr, V_ptr, seg_ptr, segref_ptr, rw_ptr, cw_ptr, NP, Q, CB,
                                           SPLIT, TRANSFORM)  # fmt: skip
            elif REDUCE:
                if far:
                    c = slab * per_group
                    while c < tl.minimum((slab + 1) * per_group, n_chan):
                        u_c, u_c_hi = _far_rows(c, I, L, ssm, A_ptr, Cr_ptr, sloc_ptr, left_ptr, seg_ptr, N,
                                                NP, Q, FAR_DOT)  # fmt: skip
                        acc = _outer(c, I, J, L, u_c, u_c_hi, sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, seg_ptr,
                                     segref_ptr, N, NP, Q, FAR_DOT, SPLIT)  # fmt: skip
                        total = _reduce_step(total, acc, c, I, J, L, rw_ptr, cw_ptr, TRANSFORM, Q)
                        c += 1
            elif far:
                total = _outer(slab, I, J, L, u, u_hi, sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, seg_ptr,
                               segref_ptr, N, NP, Q, FAR_DOT, SPLIT)  # fmt: skip
            not_near = (I < J) | (I >= J + 2)  # the near tiles are the other launch's, or the strips'
            _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, total, Q, not_near | far,
                   ALIGNED, EVICT)  # fmt: skip
            J += 1
        if STRIPS:
            if near_in:
                _strip_tiles(out_ptr, slab, stride_slab, stride_t, r0, r1, c0, c1, I, L, max_growth, near_far,
                             sloc_ptr, tot_ptr, growth_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, left_ptr, pmask_ptr,
                             N, NP, K, Q, SQ, SPLIT, ALIGNED, UNROLL)  # fmt: skip
            _store_band(out_ptr, slab, stride_slab, stride_t, t, jb, on, band, r0, r1, c0, c1, True)

    @triton.jit
    def _band_rows(acc, d, e, fix, K: tl.constexpr):
        """``acc`` with the ``K`` diagonals ``d = t − j < K`` put in from ``fix`` loaded as ``(rows, KP)``
        (column ``e`` the diagonal ``e``), a diagonal at a time (as :func:`_band`)."""
        for k in tl.static_range(K):
            fix_k = tl.sum(tl.where(e[None, :] == k, fix, 0.0), axis=1)
            acc = tl.where(d == k, fix_k[:, None], acc)
        return acc

    @triton.jit
    def _near_one_loads(c, I, t, j, m, L, sloc_ptr, tot_ptr, A_ptr, W_ptr, fix_ptr, left_ptr, rw_ptr, cw_ptr,
                        K: tl.constexpr, KP: tl.constexpr, Q: tl.constexpr):  # fmt: skip
        """Channel ``c``'s factors of a near tile of one state as loaded (:func:`_near_one_sums`): the sums
        of :func:`_gaps` (the column's carried), the input side ``W``, the rate, the band ``fix`` as ``(rows,
        KP)``, the left factors and the row and column weights."""
        t_ok = t < L
        m_ok = m < L
        j_ok = (j >= 0) & (j < L)
        n_tiles = (L + Q - 1) // Q
        tile_m = m // Q
        s_m = tl.load(sloc_ptr + c * L + m, mask=m_ok, other=0.0)
        carry = tl.load(tot_ptr + c * n_tiles + tile_m, mask=m_ok & (tile_m < I), other=0.0)
        e = tl.arange(0, KP)
        fix = tl.load(fix_ptr + (c * L + t)[:, None] * K + e[None, :], mask=t_ok[:, None] & (e < K)[None, :],
                      other=0.0)  # fmt: skip
        s_t = tl.load(sloc_ptr + c * L + t, mask=t_ok, other=0.0)
        w = tl.load(W_ptr + c * L + j, mask=j_ok, other=0.0)
        left = tl.load(left_ptr + c * L + t, mask=t_ok, other=0.0)
        rw = _weight(rw_ptr, c * L + t, t_ok)
        cw = _weight(cw_ptr, c * L + j, j_ok)
        return s_t, s_m - carry, w, tl.load(A_ptr + c), fix, left, rw, cw

    @triton.jit
    def _near_one_sums(total, c, c_end, I, J, L, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, fix_ptr, seg_ptr,
                       left_ptr, pmask_ptr, rw_ptr, cw_ptr, K: tl.constexpr, KP: tl.constexpr,
                       Q: tl.constexpr, TRANSFORM: tl.constexpr):  # fmt: skip
        """``total`` plus the (weighted, transformed) near tile ``(I, J)`` of channels ``c … c_end − 1`` of
        one state (RG-LRU), entry for entry as :func:`_near` with its band computes it: what the channels
        share (the rows of ``C``, where entries are valid, the input mask) loaded once, each channel's
        factors loaded a channel ahead of their use."""
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        m = j + (K - 1)
        valid = _valid(t, m, L, seg_ptr)
        c_rows = tl.load(C_ptr + t, mask=t < L, other=0.0)
        pm = tl.load(pmask_ptr + j, mask=(j >= 0) & (j < L), other=0.0)
        d = t[:, None] - j[None, :]
        e = tl.arange(0, KP)
        s_t, s_m, w, a, fix, left, rw, cw = _near_one_loads(
            c, I, t, j, m, L, sloc_ptr, tot_ptr, A_ptr, W_ptr, fix_ptr, left_ptr, rw_ptr, cw_ptr, K, KP, Q
        )  # fmt: skip
        while c < c_end:
            n_s_t, n_s_m, n_w, n_a, n_fix, n_left, n_rw, n_cw = _near_one_loads(
                tl.minimum(c + 1, c_end - 1), I, t, j, m, L, sloc_ptr, tot_ptr, A_ptr, W_ptr, fix_ptr,
                left_ptr, rw_ptr, cw_ptr, K, KP, Q,
            )  # fmt: skip
            gap = tl.where(valid, tl.maximum(s_t[:, None] - s_m[None, :], 0.0), 0.0)
            acc = tl.where(valid, c_rows[:, None] * _exp(a * gap) * w[None, :], 0.0)
            acc = _band_rows(acc, d, e, fix, K)
            total = _reduce_with(total, acc * left[:, None] * pm[None, :], rw, cw, TRANSFORM)
            s_t, s_m, w, a, fix, left, rw, cw = n_s_t, n_s_m, n_w, n_a, n_fix, n_left, n_rw, n_cw
            c += 1
        return total

    @triton.jit(do_not_specialize=UNSPECIALISED["_near_kernel"])
    def _near_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, L, ssm, n_chan, per_group,
        sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, fix_ptr, seg_ptr, left_ptr, pmask_ptr, rw_ptr, cw_ptr,
        N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, Q: tl.constexpr, SCALAR: tl.constexpr,
        REDUCE: tl.constexpr, TRANSFORM: tl.constexpr, ALIGNED: tl.constexpr, EVICT: tl.constexpr = 0,
    ):  # fmt: skip
        """The near tiles: row tile ``I`` against column tiles ``I`` and ``I − 1`` (dense: the band stored
        over each, :func:`_store_band`; channel sums: whole tiles of group ``slab``'s partial sums into the
        buffer at ``out_ptr``, added up by :func:`_near_sum_kernel`)."""
        I = I0 + tl.program_id(0)
        J = I - tl.program_id(1)
        slab = tl.program_id(2)
        t = I * Q + tl.arange(0, Q)
        if not REDUCE:  # loaded with the tile's first loads
            band, jb, on = _band_entries(slab, t, J * Q, J * Q + Q, L, fix_ptr, left_ptr, pmask_ptr, K, KP)
        total = tl.zeros((Q, Q), dtype=tl.float32)
        if J < 0:  # row tile 0 has no column tile before it
            pass
        elif REDUCE and N == 1 and not SCALAR:
            c_end = tl.minimum((slab + 1) * per_group, n_chan)
            total = _near_one_sums(total, slab * per_group, c_end, I, J, L, sloc_ptr, tot_ptr, A_ptr, C_ptr,
                                   W_ptr, fix_ptr, seg_ptr, left_ptr, pmask_ptr, rw_ptr, cw_ptr, K, KP, Q,
                                   TRANSFORM)  # fmt: skip
        elif REDUCE:
            c = slab * per_group
            while c < tl.minimum((slab + 1) * per_group, n_chan):
                acc = _near(c, I, J, L, ssm, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, fix_ptr, seg_ptr,
                            left_ptr, pmask_ptr, N, K, Q, SCALAR, True)  # fmt: skip
                total = _reduce_step(total, acc, c, I, J, L, rw_ptr, cw_ptr, TRANSFORM, Q)
                c += 1
        else:
            total = _near(slab, I, J, L, ssm, sloc_ptr, tot_ptr, A_ptr, C_ptr, W_ptr, fix_ptr, seg_ptr,
                          left_ptr, pmask_ptr, N, K, Q, SCALAR, False)  # fmt: skip
        if REDUCE:
            q = tl.arange(0, Q)
            part = (slab * tl.num_programs(0) + tl.program_id(0)) * 2 + tl.program_id(1)
            tl.store(out_ptr + part.to(tl.int64) * (Q * Q) + q[:, None] * Q + q[None, :], total)
        else:
            _store(
                out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, total, Q, J >= 0, ALIGNED, EVICT
            )
            _store_band(out_ptr, slab, stride_slab, stride_t, t, jb, on, band, r0, r1, c0, c1, J >= 0)

    @triton.jit(do_not_specialize=UNSPECIALISED["_near_sum_kernel"])
    def _near_sum_kernel(out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, part_ptr, parts, Q: tl.constexpr,
                         ALIGNED: tl.constexpr):  # fmt: skip
        """The near tiles of a channel sum: the ``parts`` partial sums of :func:`_near_kernel` added up in
        order into slab 0 of the output, zeros into the other slabs (the far kernel's groups)."""
        I = I0 + tl.program_id(0)
        J = I - tl.program_id(1)
        slab = tl.program_id(2)
        q = tl.arange(0, Q)
        total = tl.zeros((Q, Q), dtype=tl.float32)
        if slab == 0:
            first = (tl.program_id(0) * 2 + tl.program_id(1)) * (Q * Q)  # in the first group's tiles
            tile = part_ptr + first + q[:, None] * Q + q[None, :]
            step = (tl.num_programs(0) * 2 * Q * Q).to(tl.int64)  # one group's tiles
            g = 0
            while g < parts:
                total += tl.load(tile + g * step)
                g += 1
        _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, total, Q, J >= 0, ALIGNED, 0)

    @triton.jit(do_not_specialize=UNSPECIALISED["_strip_kernel"])
    def _strip_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, L, ssm, n_chan, per_group, max_growth,
        sloc_ptr, tot_ptr, growth_ptr, A_ptr, C_ptr, W_ptr, fix_ptr, seg_ptr, left_ptr, pmask_ptr,
        rw_ptr, cw_ptr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, Q: tl.constexpr,
        SQ: tl.constexpr, SPLIT: tl.constexpr, TRANSFORM: tl.constexpr, ALIGNED: tl.constexpr,
    ):  # fmt: skip
        """Channel sums of the near tiles by row strips (:func:`_strip_sums`): strip ``i`` of row tile ``I``
        against column tiles ``I`` and ``I − 1``, summed over a group of ``per_group`` channels; ``main``
        written with the zeros past the strip's diagonal block, ``diag`` apart."""
        I = I0 + tl.program_id(0) // (Q // SQ)
        i = tl.program_id(0) % (Q // SQ)
        J = I - tl.program_id(1)
        slab = tl.program_id(2)
        R, t, j, jd = _strip_at(I, i, J, Q, SQ)
        main = tl.zeros((SQ, Q), dtype=tl.float32)
        diag = tl.zeros((SQ, SQ), dtype=tl.float32)
        if J >= 0:  # row tile 0 has no column tile before it
            c_end = tl.minimum((slab + 1) * per_group, n_chan)
            main, diag = _strip_sums(main, diag, slab * per_group, c_end, I, i, J, L, ssm, max_growth,
                                     sloc_ptr, tot_ptr, growth_ptr, A_ptr, C_ptr, W_ptr, fix_ptr, seg_ptr,
                                     left_ptr, pmask_ptr, rw_ptr, cw_ptr, N, NP, K, KP, Q, SQ, SPLIT,
                                     TRANSFORM)  # fmt: skip
        outside = tl.where(J >= 0, (j < R) | (j >= R + SQ), False)  # diag's columns: the other store's
        _store_at(
            out_ptr, slab, stride_slab, stride_t, t, j, r0, r1, c0, c1, main, outside[None, :], ALIGNED, 0
        )
        _store_at(out_ptr, slab, stride_slab, stride_t, t, jd, r0, r1, c0, c1, diag, J == I, ALIGNED, 0)

    @triton.jit
    def _column_side(c, I, J, L, sloc_ptr, tot_ptr, W_ptr, pmask_ptr, N: tl.constexpr, NP: tl.constexpr,
                     K: tl.constexpr, Q: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
        """Column tile ``J``'s side of row tile ``I``'s near tiles, its first ``WIDTH`` columns: the columns
        ``j``, their last conv taps ``m``, ``S_{m+1} − S_{IQ}`` (a tile-local sum, plus the carry of ``m``'s
        tile where it is ``I − 1``), ``W`` (``WIDTH × NP``) and the input mask."""
        j = J * Q + tl.arange(0, WIDTH)
        j_ok = (j >= 0) & (j < L)
        m = j + (K - 1)
        m_ok = m < L
        tile_m = m // Q
        n = tl.arange(0, NP)
        s_m = tl.load(sloc_ptr + c * L + m, mask=m_ok, other=0.0)
        carry = tl.load(tot_ptr + c * ((L + Q - 1) // Q) + tile_m, mask=m_ok & (tile_m < I), other=0.0)
        w = tl.load(W_ptr + (c * N + n[None, :]) * L + j[:, None], mask=j_ok[:, None] & (n < N)[None, :],
                    other=0.0)  # fmt: skip
        return j, m, s_m - carry, w, tl.load(pmask_ptr + j, mask=j_ok, other=0.0)

    @triton.jit
    def _strip_product(c, I, s, L, max_growth, j, m, s_m, w, a2, sloc_ptr, growth_ptr, C_ptr, seg_ptr,
                       left_ptr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, Q: tl.constexpr,
                       SQ: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
        """Strip ``s`` of row tile ``I`` (rows ``t`` from ``R = IQ + s·SQ``) against the columns of
        :func:`_column_side`, factorised through ``S_R``: ``U · Yᵀ`` with ``U[t, n] = C[t, n] e^{A_n (S_{t+1}
        − S_R)} ≤ |C|`` and ``Y[j, n] = e^{A_n (S_R − S_{m+1})} W[j, n]`` on the columns whose factors
        cannot overflow: every ``j ≤ R − K`` (its last tap at or before ``R − 1``, factor ``≤ 1``), the
        ``K − 1`` before ``R`` where the strip's growth is at most ``max_growth``, the diagonal block's where
        its growth is too. The other columns of the strip's diagonal band are zeros here
        (:func:`_strip_blocks` writes them), the left factors applied. ``a2``: the rates times ``log₂e``.
        Every load of the strip is issued before its exponentials and product (the left factors and the
        segments had waited until after the product: Mamba-1's kernel 0.637 → 0.621 ms at L = 512)."""
        R = I * Q + s * SQ
        t = R + tl.arange(0, SQ)
        t_ok = t < L
        n = tl.arange(0, NP)
        at = growth_ptr + (c * ((L + SQ - 1) // SQ) + R // SQ) * 2
        growth = tl.load(at, mask=R < L, other=0.0)  # strips past the sequence have none: read none
        block = tl.load(at + 1, mask=R < L, other=0.0)
        c_rows = tl.load(C_ptr + n[None, :] * L + t[:, None], mask=t_ok[:, None] & (n < N)[None, :],
                         other=0.0)  # fmt: skip
        # S_R − S_IQ (0 for the tile's first strip)
        off = tl.load(sloc_ptr + c * L + tl.maximum(R - 1, 0), mask=(R > I * Q) & (R - 1 < L), other=0.0)
        s_t = tl.load(sloc_ptr + c * L + t, mask=t_ok, other=0.0)
        # every load of the strip goes out here, before the product: the left factors and the segments too
        left = tl.load(left_ptr + c * L + t, mask=t_ok, other=0.0)
        seg_t = tl.load(seg_ptr + t, mask=t_ok, other=0)
        seg_m = tl.load(seg_ptr + m, mask=m < L, other=-1)
        row_gap = tl.where(t_ok, s_t - off, 0.0)  # S_{t+1} − S_R ≥ 0 (0 past the sequence: no overflow)
        u = c_rows * _exp2(a2[None, :] * row_gap[:, None])
        # (scalar conditions: where(), not &, for every Triton)
        cols = (j <= R - K) | tl.where(growth <= max_growth, j < R, False)
        cols = cols | tl.where(block <= max_growth, j < R + SQ, False)
        cols = tl.where(R < L, cols, False)  # a strip past the sequence reads no sums: its gaps overflow
        y = w * _exp2(a2[None, :] * tl.where(cols, off - s_m, 0.0)[:, None])
        y = tl.where(cols[:, None], y, 0.0)
        acc = _product(u, y, SPLIT)
        acc = tl.where(_valid_in(t, m, L, seg_t, seg_m), acc, 0.0)
        return t, acc * left[:, None]

    #: strips whose blocks :func:`_strip_blocks` computes in one pass (a power of two): on the H200, Mamba-1's
    #: kernel at L = 512 / 1024 / 2048 took 0.662 / 2.159 / 8.01 ms a strip at a time, 0.657 / 2.151 / 8.03
    #: two, 0.637 / 2.10 / 7.82 four (the same matrices bit for bit; sweep_oo.json)
    BLOCK_STRIPS = tl.constexpr(4)

    @triton.jit
    def _strip_blocks(out_ptr, c, stride_slab, stride_t, r0, r1, c0, c1, I, L, max_growth, sloc_ptr,
                      growth_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, left_ptr, pmask_ptr, N: tl.constexpr,
                      K: tl.constexpr, Q: tl.constexpr, SQ: tl.constexpr):  # fmt: skip
        """What :func:`_strip_product` leaves out of row tile ``I``'s strips, every entry directly, stored
        over it: in each strip whose diagonal block grows too much, the entries ``(t, j)`` of its rows and
        the ``SQ`` columns ``R − K + 1 … R − K + SQ`` whose last tap ``m = j + K − 1`` lies before the row
        (``m < t``). Those columns are all those whose factor may grow (the last tap past ``R − 1``) and have
        an entry off the band in the strip (the last tap at or before ``R + SQ − 1``), so one block holds both
        what the product leaves out before the diagonal block (where the strip's own growth is too large:
        then so is its block's) and in it; ``m ≥ t`` is the product's zeros and the band's.

        Only those ``SQ (SQ − 1) / 2`` entries a strip are computed: the block's lower triangle folded into
        an ``SQ/2 × SQ`` rectangle (lane ``(i, q)``: ``(t, m) = (R + q, R + i)`` for ``q > i``, else
        ``(R + SQ − 1 − q, R + SQ − 1 − i)``; ``q = i`` is idle), half the terms of the whole block, summed
        state by state as :func:`_diagonal_block` sums them (a strip's block: 422 → 250 SASS instructions).
        ``BLOCK_STRIPS`` strips go in one pass, so that their loads wait for memory once (the blocks held 27 %
        of the kernel's stall samples in run MM's ``ncu`` profile, half of them waiting for loads, at 25 %
        occupancy). A pass where none of its strips grows too much is skipped; the others' lanes compute and
        store nothing. Stored an entry at a time."""
        LANES: tl.constexpr = SQ * SQ // 2
        lane = tl.arange(0, BLOCK_STRIPS * LANES)
        i = lane % LANES // SQ
        q = lane % SQ
        upper = q > i
        below = tl.where(upper, q, SQ - 1 - q)  # t − R
        across = tl.where(upper, i, SQ - 1 - i)  # m − R
        growths = growth_ptr + (c * ((L + SQ - 1) // SQ) + I * (Q // SQ)) * 2 + 1  # strip 0's block growth
        for first in range(0, Q // SQ, BLOCK_STRIPS):
            grows = tl.load(growths + 2 * first, mask=I * Q + first * SQ < L, other=0.0) > max_growth
            for d in tl.static_range(1, BLOCK_STRIPS):  # strips of the tile, none past L
                there = (first + d < Q // SQ) & (I * Q + (first + d) * SQ < L)
                grows = grows | (tl.load(growths + 2 * (first + d), mask=there, other=0.0) > max_growth)
            if grows:
                s = tl.minimum(first + lane // LANES, Q // SQ - 1)  # lanes past the tile's strips: its last
                R = I * Q + s * SQ
                t = R + below
                m = R + across
                j = m - (K - 1)
                # m < t; t in the sequence and in m's segment (both in tile I: local sums, no carry)
                t_in, j_in = _clamped(t, j, L)
                m_in = tl.minimum(m, L - 1)
                valid = (q != i) & (t < L) & (tl.load(seg_ptr + t_in) == tl.load(seg_ptr + m_in))
                gap = tl.load(sloc_ptr + c * L + t_in) - tl.load(sloc_ptr + c * L + m_in)
                gap = tl.where(valid, tl.maximum(gap, 0.0), 0.0) * LOG2E
                acc = tl.zeros((BLOCK_STRIPS * LANES,), dtype=tl.float32)
                if N <= 32:  # unrolled: every state's loads go out at once
                    for n in tl.static_range(N):
                        acc = _block_term(acc, c, n, t_in, j_in, gap, L, A_ptr, C_ptr, W_ptr, N)
                else:  # (unrolled, more states would hold more loads than registers)
                    for n in range(N):
                        acc = _block_term(acc, c, n, t_in, j_in, gap, L, A_ptr, C_ptr, W_ptr, N)
                acc = tl.where(valid, acc, 0.0) * tl.load(left_ptr + c * L + t_in)
                acc = acc * tl.load(pmask_ptr + j_in, mask=j >= 0, other=0.0)
                direct = tl.load(growths + 2 * s, mask=R < L, other=0.0) > max_growth
                direct = direct & (first + lane // LANES < Q // SQ)
                rows = (t - r0).to(tl.int64) * stride_t + c.to(tl.int64) * stride_slab
                inside = direct & (q != i) & (t >= r0) & (t < r1) & (j >= c0) & (j < c1)
                tl.store(out_ptr + rows + (j - c0), acc, mask=inside)

    @triton.jit
    def _zeros_past(out_ptr, c, stride_slab, stride_t, t, first, r0, r1, c0, c1, COLS: tl.constexpr,
                    SQ: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
        """Zeros in rows ``t`` over the ``COLS`` columns from ``first`` (both multiples of ``SQ``), ``SQ`` at
        a time."""
        zeros = tl.zeros((SQ, SQ), dtype=tl.float32)
        for k in tl.static_range(COLS // SQ):
            j = first + k * SQ + tl.arange(0, SQ)
            _store_at(out_ptr, c, stride_slab, stride_t, t, j, r0, r1, c0, c1, zeros, True, ALIGNED, 0)

    @triton.jit
    def _near_strip(out_ptr, c, stride_slab, stride_t, r0, r1, c0, c1, I, J, s, L, max_growth, a2, sloc_ptr,
                    tot_ptr, growth_ptr, C_ptr, W_ptr, seg_ptr, left_ptr, pmask_ptr, N: tl.constexpr,
                    NP: tl.constexpr, K: tl.constexpr, Q: tl.constexpr, SQ: tl.constexpr, WIDTH: tl.constexpr,
                    SPLIT: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
        """Strip ``s`` of near tile ``(I, J)``: :func:`_strip_product` over the tile's first ``WIDTH``
        columns, zeros past them (``WIDTH < Q``: tile ``(I, I)``, where they are above the diagonal)."""
        j, m, s_m, w, pm = _column_side(c, I, J, L, sloc_ptr, tot_ptr, W_ptr, pmask_ptr, N, NP, K, Q, WIDTH)
        ts, acc = _strip_product(c, I, s, L, max_growth, j, m, s_m, w, a2, sloc_ptr, growth_ptr, C_ptr,
                                 seg_ptr, left_ptr, N, NP, K, Q, SQ, SPLIT)  # fmt: skip
        _store_at(
            out_ptr, c, stride_slab, stride_t, ts, j, r0, r1, c0, c1, acc * pm[None, :], True, ALIGNED, 0
        )
        _zeros_past(out_ptr, c, stride_slab, stride_t, ts, I * Q + WIDTH, r0, r1, c0, c1, Q - WIDTH, SQ,
                    ALIGNED)  # fmt: skip

    @triton.jit
    def _strip_tiles(
        out_ptr, c, stride_slab, stride_t, r0, r1, c0, c1, I, L, max_growth, taken,
        sloc_ptr, tot_ptr, growth_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, left_ptr, pmask_ptr,
        N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, Q: tl.constexpr, SQ: tl.constexpr,
        SPLIT: tl.constexpr, ALIGNED: tl.constexpr, UNROLL: tl.constexpr,
    ):  # fmt: skip
        """Dense reads of row tile ``I``'s near tiles by strips (Mamba-1), in the far kernel's program: tile
        ``(I, I)`` and, unless the far product ``taken`` it, ``(I, I − 1)``, each strip of each by
        :func:`_strip_product` (:func:`_near_strip`), then, after a barrier, the blocks those leave out
        (:func:`_strip_blocks`). The band is the caller's to store over them.

        Strip ``s`` of tile ``(I, I)`` is zero past its diagonal block: its product takes the tile's first
        ``2^g·SQ`` columns, the least that hold its block but at least two strips' (with 16-row strips of a
        64-tile: 32, 32, 64, 64, 192 columns of products where there were 256), and the columns past them
        are stored as zeros. Strips of one width go in a loop, the widest with tile ``(I, I − 1)``'s: two
        loops of one width let the compiler hold both loops' loads at once (100 bytes spilled at 128
        registers), and software-pipelining the loops did too (``num_stages=1``). ``UNROLL`` (1 or 2): the
        narrower widths' loops unrolled by it (short reads, :data:`TUNING` ``"short_tiles"``), so that both
        strips' loads go out at once."""
        a2 = tl.load(A_ptr + c * N + tl.arange(0, NP), mask=tl.arange(0, NP) < N, other=0.0) * LOG2E
        STRIPS: tl.constexpr = Q // SQ
        WIDEST: tl.constexpr = 0 if STRIPS == 2 else STRIPS // 2  # tile (I, I)'s first strip as wide as Q
        for g in tl.static_range(1, 8):  # tile (I, I)'s strips [2^(g−1), 2^g) (from 0 for g = 1), 2^g·SQ wide
            if 2**g < STRIPS:
                first = 0 if g == 1 else 2 ** (g - 1)
                for s in tl.range(first, 2**g, num_stages=1, loop_unroll_factor=UNROLL):
                    _near_strip(out_ptr, c, stride_slab, stride_t, r0, r1, c0, c1, I, I, s, L, max_growth, a2,
                                sloc_ptr, tot_ptr, growth_ptr, C_ptr, W_ptr, seg_ptr, left_ptr, pmask_ptr, N,
                                NP, K, Q, SQ, (2**g) * SQ, SPLIT, ALIGNED)  # fmt: skip
        # one loop for the rest, all as wide as Q: tile (I, I)'s last strips, then tile (I, I − 1)'s every
        # strip (a second loop would let the compiler keep both loops' loads in registers at once: spills)
        n = STRIPS - WIDEST + tl.where(taken | (I == 0), 0, STRIPS)
        k = 0
        while k < n:  # while: Triton's interpreter cannot range() over arguments
            J = tl.where(k < STRIPS - WIDEST, I, I - 1)
            s = tl.where(k < STRIPS - WIDEST, WIDEST + k, k - (STRIPS - WIDEST))
            _near_strip(out_ptr, c, stride_slab, stride_t, r0, r1, c0, c1, I, J, s, L, max_growth, a2,
                        sloc_ptr, tot_ptr, growth_ptr, C_ptr, W_ptr, seg_ptr, left_ptr, pmask_ptr, N, NP, K,
                        Q, SQ, Q, SPLIT, ALIGNED)  # fmt: skip
            k += 1
        tl.debug_barrier()  # the blocks go over the products' zeros
        _strip_blocks(out_ptr, c, stride_slab, stride_t, r0, r1, c0, c1, I, L, max_growth, sloc_ptr,
                      growth_ptr, A_ptr, C_ptr, W_ptr, seg_ptr, left_ptr, pmask_ptr, N, K, Q, SQ)  # fmt: skip

    @triton.jit
    def _wkv_loads(c, t, j, L, key_ptr, logz_ptr, w_ptr, u_ptr, left_ptr, right_ptr, left_stride,
                   right_stride):  # fmt: skip
        """Channel ``c``'s factors on rows ``t`` and columns ``j`` as loaded, for :func:`_wkv_entries`: its
        rate and bonus, ``log z_t``, keys ``k_j`` and ``k_t``, left and right factors (at ``c · stride``;
        stride 0: one vector of ones for every channel)."""
        t_ok = t < L
        j_ok = j < L
        return (
            tl.load(w_ptr + c), tl.load(u_ptr + c),
            tl.load(logz_ptr + c * L + t, mask=t_ok, other=0.0),
            tl.load(key_ptr + c * L + j, mask=j_ok, other=0.0),
            tl.load(key_ptr + c * L + t, mask=t_ok, other=0.0),
            tl.load(left_ptr + c * left_stride + t, mask=t_ok, other=0.0),
            tl.load(right_ptr + c * right_stride + j, mask=j_ok, other=0.0),
        )  # fmt: skip

    @triton.jit
    def _wkv_entries(t, j, L, rate, bonus, logz, key_j, key_t, left, right, pm):
        """A tile of the normalised WKV (:class:`WKVTiles`) from one channel's factors
        (:func:`_wkv_loads`) and the input mask ``pm``, exponents in float64."""
        t_ok = t < L
        j_ok = j < L
        row = -logz
        col = key_j + rate
        diag = key_t + bonus
        # rate · (j − t) + col + row as (row − rate t) + (col + rate j): one float64 sum an entry
        expo = ((row - rate * t.to(tl.float64))[:, None] + (col + rate * j.to(tl.float64))[None, :]).to(
            tl.float32
        )
        expo = tl.where(j[None, :] == t[:, None], (diag + row).to(tl.float32)[:, None], expo)
        inside = (j[None, :] <= t[:, None]) & t_ok[:, None] & j_ok[None, :]
        acc = _exp(tl.where(inside, expo, float("-inf")))  # no overflow
        acc = acc * left[:, None]
        return acc * (right * pm)[None, :]

    @triton.jit
    def _wkv_far_sums(total, t, j, L, c, c_end, key_ptr, logz_ptr, w_ptr, left_ptr, right_ptr, left_stride,
                      right_stride, pm, rw_ptr, cw_ptr, CB: tl.constexpr, SPLIT: tl.constexpr,
                      TRANSFORM: tl.constexpr):  # fmt: skip
        """``total`` plus the (weighted, transformed) sum over channels ``c … c_end − 1`` of a far tile (every
        column before every row). There channel ``c``'s entry ``exp((−log Z_t − w t) + (k_j + w (j + 1)))``
        (:func:`_wkv_entries`) is a product of a row and a column factor, so the tile is rank one and the sum
        over channels one product ``X Yᵀ`` whose depth is the channels, ``CB`` at a time
        (:func:`_rank_one_add`), as RG-LRU's far sums: two exponentials an entry of ``X`` and ``Y`` where the
        loop takes one an entry of the tile. Each channel's column factors are shifted by their largest
        exponent ``s`` over the tile (float64, as the exponents): ``k_j + w (j + 1) − s ≤ 0``, and
        ``s − log Z_t − w t ≤ 0`` because ``Z_t`` sums every earlier key's term, so neither factor overflows,
        whatever the keys."""
        t_ok = t < L
        j_ok = j < L
        t64 = t.to(tl.float64)
        j64 = (j + 1).to(tl.float64)
        while c < c_end:
            cc = c + tl.arange(0, CB)
            c_ok = cc < c_end
            rate = tl.load(w_ptr + cc, mask=c_ok, other=0.0)  # (CB,) float64
            cols = cc[None, :] * L + j[:, None]  # (Q, CB)
            k_ok = j_ok[:, None] & c_ok[None, :]
            col = tl.load(key_ptr + cols, mask=k_ok, other=0.0) + rate[None, :] * j64[:, None]
            col = tl.where(k_ok, col, float("-inf"))
            shift = tl.max(col, axis=0)
            shift = tl.where(shift > float("-inf"), shift, 0.0)  # channels past the end: no columns
            rows = cc[None, :] * L + t[:, None]
            r_ok = t_ok[:, None] & c_ok[None, :]
            logz = tl.load(logz_ptr + rows, mask=r_ok, other=0.0)
            row = shift[None, :] - logz - rate[None, :] * t64[:, None]
            x = _exp(tl.where(r_ok, row, float("-inf")).to(tl.float32))
            x = x * tl.load(left_ptr + cc[None, :] * left_stride + t[:, None], mask=r_ok, other=0.0)
            x = x * _weight(rw_ptr, rows, r_ok)
            y = _exp((col - shift[None, :]).to(tl.float32))
            y = y * tl.load(right_ptr + cc[None, :] * right_stride + j[:, None], mask=k_ok, other=0.0)
            y = y * (_weight(cw_ptr, cols, k_ok) * pm[:, None])
            total = _rank_one_add(total, x, y, SPLIT, TRANSFORM)
            c += CB
        return total

    @triton.jit(do_not_specialize=UNSPECIALISED["_wkv_kernel"])
    def _wkv_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, J0, nJ, span, L, n_chan, per_group,
        key_ptr, logz_ptr, w_ptr, u_ptr, left_ptr, right_ptr, pmask_ptr, rw_ptr, cw_ptr,
        left_stride, right_stride,
        Q: tl.constexpr, REDUCE: tl.constexpr, TRANSFORM: tl.constexpr, ALIGNED: tl.constexpr,
        CB: tl.constexpr, SPLIT: tl.constexpr, EVICT: tl.constexpr = 0,
    ):  # fmt: skip
        """Every tile of the read, zeros above the diagonal; programs as in :func:`_far_kernel`. Channel sums
        of far tiles as products over ``CB`` channels at a time (:func:`_wkv_far_sums`; ``CB = 0``: a channel
        at a time, as diagonal tiles always are)."""
        I = I0 + tl.program_id(0)
        J = J0 + tl.program_id(1) * span
        J_end = tl.minimum(J + span, J0 + nJ)
        slab = tl.program_id(2)
        t = I * Q + tl.arange(0, Q)
        while J < J_end:
            j = J * Q + tl.arange(0, Q)
            total = tl.zeros((Q, Q), dtype=tl.float32)
            if J <= I:
                pm = tl.load(pmask_ptr + j, mask=j < L, other=0.0)
                if REDUCE and CB > 0 and J < I:
                    total = _wkv_far_sums(
                        total, t, j, L, slab * per_group, tl.minimum((slab + 1) * per_group, n_chan),
                        key_ptr, logz_ptr, w_ptr, left_ptr, right_ptr, left_stride, right_stride, pm, rw_ptr,
                        cw_ptr, CB, SPLIT, TRANSFORM,
                    )  # fmt: skip
                elif REDUCE:
                    # each channel's factors loaded a channel ahead of their use: a channel's exponentials
                    # waited for its own loads
                    c = slab * per_group
                    c_end = tl.minimum((slab + 1) * per_group, n_chan)
                    rate, bonus, logz, key_j, key_t, left, right = _wkv_loads(
                        c, t, j, L, key_ptr, logz_ptr, w_ptr, u_ptr, left_ptr, right_ptr, left_stride,
                        right_stride,
                    )  # fmt: skip
                    while c < c_end:
                        n_rate, n_bonus, n_logz, n_key_j, n_key_t, n_left, n_right = _wkv_loads(
                            tl.minimum(c + 1, c_end - 1), t, j, L, key_ptr, logz_ptr, w_ptr, u_ptr, left_ptr,
                            right_ptr, left_stride, right_stride,
                        )  # fmt: skip
                        acc = _wkv_entries(t, j, L, rate, bonus, logz, key_j, key_t, left, right, pm)
                        total = _reduce_at(total, acc, c, t, j, L, rw_ptr, cw_ptr, TRANSFORM)
                        rate, bonus, logz, key_j, key_t, left, right = (
                            n_rate, n_bonus, n_logz, n_key_j, n_key_t, n_left, n_right
                        )  # fmt: skip
                        c += 1
                else:
                    rate, bonus, logz, key_j, key_t, left, right = _wkv_loads(
                        slab, t, j, L, key_ptr, logz_ptr, w_ptr, u_ptr, left_ptr, right_ptr, left_stride,
                        right_stride,
                    )  # fmt: skip
                    total = _wkv_entries(t, j, L, rate, bonus, logz, key_j, key_t, left, right, pm)
            _store(
                out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, total, Q, J >= 0, ALIGNED, EVICT
            )
            J += 1

    @triton.jit
    def _head_core(hh, t, m, L, t_ok, cum_t, a, cum_ptr, delta_ptr, B_ptr, C_ptr, N: tl.constexpr,
                   NC: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
        """``R_h[t, m] = C_t · B_m · exp(a_h Σ_{m<k≤t} Δ_k) · Δ_m`` of head ``hh`` (zero for ``m > t``).

        ``C_t · B_m`` in chunks of ``NC`` states (a loop, not unrolled): one product over all ``N = 128``
        holds each thread's operand rows in registers and spills (``benchmarks/kernel_registers.py``);
        ``SPLIT``: on the tensor cores (:func:`_product`), else IEEE float32 products."""
        m_ok = m < L
        scores = tl.zeros((t.shape[0], m.shape[0]), dtype=tl.float32)
        for n0 in range(0, N, NC):
            n = n0 + tl.arange(0, NC)
            c_rows = tl.load(C_ptr + t[:, None] * N + n[None, :], mask=t_ok[:, None], other=0.0)
            b_rows = tl.load(B_ptr + m[:, None] * N + n[None, :], mask=m_ok[:, None], other=0.0)
            scores += _product(c_rows, b_rows, SPLIT)
        cum_m = tl.load(cum_ptr + hh * L + m, mask=m_ok, other=0.0)
        gap = tl.maximum((cum_t[:, None] - cum_m[None, :]).to(tl.float32), 0.0)  # float64 difference
        delta = tl.load(delta_ptr + hh * L + m, mask=m_ok, other=0.0)
        valid = (m[None, :] <= t[:, None]) & m_ok[None, :] & t_ok[:, None]
        return tl.where(valid, scores * _exp(a * gap) * delta[None, :], 0.0)

    @triton.jit
    def _head_windows(I, J, hh, t, t_ok, cum_t, a, L, ssm, d_skip, scratch, cum_ptr, delta_ptr, B_ptr, C_ptr,
                      N: tl.constexpr, Q: tl.constexpr, H: tl.constexpr, NC: tl.constexpr,
                      SPLIT: tl.constexpr):  # fmt: skip
        """The four shifted windows ``core[t, j + k]`` (``k < 4``) of head ``hh`` over column tile ``J``, the
        core plus the head's skip ``d_skip`` on its diagonal (so that each channel's conv takes the skip
        through the tap ``t − j`` as it takes the recurrence), zeros above the diagonal. The core over the
        columns and a conv halo is computed once, into this program's ``scratch`` (``Q × (Q + H)``), and all
        four windows are read back from it: in one layout, so that a channel's sum and store need no
        reshuffle."""
        q = tl.arange(0, Q)
        cells = scratch + q[:, None] * (Q + H) + q[None, :]
        w0 = tl.zeros((Q, Q), dtype=tl.float32)
        w1 = w0
        w2 = w0
        w3 = w0
        if J <= I:
            j = J * Q + q
            h = (J + 1) * Q + tl.arange(0, H)
            core = tl.where(j[None, :] == t[:, None], d_skip, 0.0)
            halo = tl.where(h[None, :] == t[:, None], d_skip, 0.0)
            if ssm != 0:
                core += _head_core(hh, t, j, L, t_ok, cum_t, a, cum_ptr, delta_ptr, B_ptr, C_ptr, N, NC,
                                   SPLIT)  # fmt: skip
                halo += _head_core(hh, t, h, L, t_ok, cum_t, a, cum_ptr, delta_ptr, B_ptr, C_ptr, N, NC,
                                   SPLIT)  # fmt: skip
            tl.store(cells, core)
            tl.store(scratch + q[:, None] * (Q + H) + (Q + tl.arange(0, H))[None, :], halo)
            tl.debug_barrier()  # the whole tile is in the scratch before any thread reads it shifted
            w0 = tl.load(cells)
            w1 = tl.load(cells + 1)
            w2 = tl.load(cells + 2)
            w3 = tl.load(cells + 3)
            tl.debug_barrier()  # every thread holds its windows before the next tile overwrites them
        return w0, w1, w2, w3

    @triton.jit
    def _tap(taps_ptr, c, K, k):
        """Channel ``c``'s conv weight on the input ``k`` positions after a column: ``taps[c, K − 1 − k]``,
        zero past the conv's ``K`` taps (a masked load: nothing waits for it where it is issued). ``c`` may be
        a vector of channels: ``k < K`` is compared in its shape, as Triton 3.9's interpreter refuses a
        scalar mask on a vector of pointers ("mask has unsupported dtype"), which 3.6 broadcast."""
        return tl.load(taps_ptr + c * K + tl.maximum(K - 1 - k, 0), mask=c * 0 + k < K, other=0.0)

    @triton.jit
    def _kept(ptr, mask, EVICT: tl.constexpr):
        """``tl.load(ptr, mask, other=0)``, kept in the L2 (``EVICT == 2``, :data:`EVICTIONS`) or not."""
        if EVICT == 2:
            return tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_last")
        return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit
    def _head_loads(c, I, J, t, j, L, taps_ptr, K, right_ptr, left_ptr, EVICT: tl.constexpr):
        """Channel ``c``'s factors on tile ``(I, J)`` as loaded, nothing computed from them yet: its conv
        taps ``tap_k`` and right factors ``r_{j+k}`` (``k < 4``) and its left factors (none above the
        diagonal), for :func:`_head_channel`. The by-head kernel loads them one channel ahead and uses them a
        whole channel later: arithmetic on them where they are loaded waited for them there (``ncu``, run
        QQ). ``EVICT``: the loads' L2 eviction policy."""
        cols = tl.where(J <= I, j < L, False)  # (a scalar condition: where(), not &, for every Triton)
        rows = tl.where(J <= I, t < L, False)
        right = right_ptr + c * L + j
        return (
            _tap(taps_ptr, c, K, 0), _tap(taps_ptr, c, K, 1),
            _tap(taps_ptr, c, K, 2), _tap(taps_ptr, c, K, 3),
            _kept(right, cols, EVICT),
            _kept(right + 1, cols & (j + 1 < L), EVICT),
            _kept(right + 2, cols & (j + 2 < L), EVICT),
            _kept(right + 3, cols & (j + 3 < L), EVICT),
            _kept(left_ptr + c * L + t, rows, EVICT),
        )  # fmt: skip

    @triton.jit
    def _head_channel(I, J, w0, w1, w2, w3, tap0, tap1, tap2, tap3, rt0, rt1, rt2, rt3, left, pm):
        """A channel's entries of tile ``(I, J)`` from its head's windows ``w_k`` (the skip in them) and its
        factors (:func:`_head_loads`): ``Σ_k w_k · tap_k r_{j+k}`` (the input mask ``pm`` in the column
        factors, not on every entry) times the gate, four multiply-adds an entry; above the diagonal zeros
        (``+0.0``: products of the zeros there could carry a sign)."""
        acc = tl.zeros(w0.shape, dtype=tl.float32)
        if J <= I:
            acc = w0 * (tap0 * rt0 * pm)[None, :] + w1 * (tap1 * rt1 * pm)[None, :]
            acc += w2 * (tap2 * rt2 * pm)[None, :]
            acc += w3 * (tap3 * rt3 * pm)[None, :]
            acc = acc * left[:, None]
        return acc

    @triton.jit(do_not_specialize=UNSPECIALISED["_head_kernel"])
    def _head_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, J0, nI, nJ, L, ssm, n_heads,
        scratch_ptr, cum_ptr, A_ptr, delta_ptr, B_ptr, C_ptr, chan_ptr, start_ptr, taps_ptr, K, right_ptr,
        left_ptr, D_ptr, skip, pmask_ptr,
        N: tl.constexpr, Q: tl.constexpr, H: tl.constexpr, NC: tl.constexpr, SPLIT: tl.constexpr,
        ALIGNED: tl.constexpr, EVICT: tl.constexpr = 0, LOAD_EVICT: tl.constexpr = 0,
    ):  # fmt: skip
        """Items ``(tile, head)``, ``tile = (I − I0) · nJ + J − J0``: program ``p`` takes items ``p``,
        ``p + programs``, … (as many programs as the device runs at once, :class:`HeadTiles`, each with its
        own scratch). Per item, the head's four shifted windows once (:func:`_head_windows`), then each of
        the head's channels in the read (``chan[start_hh : start_{hh+1}]``) costs four multiply-adds an
        entry and its store (:func:`_head_channel`). Each core tile is computed once, and no wave of
        programs runs half full: programs of a row tile each, channels split among them, computed each
        core as often as the split and left the last of three waves a fifth full at L = 512."""
        q = tl.arange(0, Q)
        scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * (Q * (Q + H))
        item = tl.program_id(0)
        while item < nI * nJ * n_heads:
            hh = item % n_heads
            tile = item // n_heads
            p = tl.load(start_ptr + hh)
            end = tl.load(start_ptr + hh + 1)
            if p < end:  # heads without channels in this read are skipped
                I = I0 + tile // nJ
                J = J0 + tile % nJ
                t = I * Q + q
                j = J * Q + q
                cum_t = tl.load(cum_ptr + hh * L + t, mask=t < L, other=0.0)
                a = tl.load(A_ptr + hh)
                d_skip = tl.where(skip != 0, tl.load(D_ptr + hh), 0.0)
                pm = tl.load(pmask_ptr + j, mask=j < L, other=0.0)
                w0, w1, w2, w3 = _head_windows(
                    I, J, hh, t, t < L, cum_t, a, L, ssm, d_skip, scratch, cum_ptr, delta_ptr, B_ptr, C_ptr,
                    N, Q, H, NC, SPLIT,
                )  # fmt: skip
                _head_channels(  # stored: no sum, no weights (any pointer stands in)
                    0.0, w0, w1, w2, w3, I, J, t, j, L, p, end, chan_ptr, taps_ptr, K, right_ptr, left_ptr,
                    pm, out_ptr, stride_slab, stride_t, r0, r1, c0, c1, pmask_ptr, pmask_ptr, Q, ALIGNED,
                    False, 0, EVICT, LOAD_EVICT,
                )  # fmt: skip
            item += tl.num_programs(0)

    @triton.jit
    def _head_channels(total, w0, w1, w2, w3, I, J, t, j, L, p, end, chan_ptr, taps_ptr, K, right_ptr,
                       left_ptr, pm, out_ptr, stride_slab, stride_t, r0, r1, c0, c1, rw_ptr, cw_ptr,
                       Q: tl.constexpr, ALIGNED: tl.constexpr, REDUCE: tl.constexpr,
                       TRANSFORM: tl.constexpr, EVICT: tl.constexpr,
                       LOAD_EVICT: tl.constexpr):  # fmt: skip
        """One head's channels ``chan[p : end]`` on tile ``(I, J)``, a channel at a time
        (:func:`_head_channel`): each stored into its slab of the output, or (``REDUCE``) weighted,
        transformed and added to ``total`` (:func:`_reduce_at`), which is returned. Each channel's factors
        are loaded while the channel before is computed, and its id a channel earlier still: a channel's own
        loads (its id, then its factors, which depend on the id) stalled its arithmetic."""
        c = tl.load(chan_ptr + p)
        c_next = tl.load(chan_ptr + tl.minimum(p + 1, end - 1))
        tap0, tap1, tap2, tap3, rt0, rt1, rt2, rt3, left = _head_loads(
            c, I, J, t, j, L, taps_ptr, K, right_ptr, left_ptr, LOAD_EVICT
        )  # fmt: skip
        while p < end:
            c_after = tl.load(chan_ptr + tl.minimum(p + 2, end - 1))
            n_tap0, n_tap1, n_tap2, n_tap3, n_rt0, n_rt1, n_rt2, n_rt3, n_left = _head_loads(
                c_next, I, J, t, j, L, taps_ptr, K, right_ptr, left_ptr, LOAD_EVICT
            )  # fmt: skip
            acc = _head_channel(I, J, w0, w1, w2, w3, tap0, tap1, tap2, tap3, rt0, rt1, rt2, rt3, left, pm)
            if REDUCE:
                total = _reduce_at(total, acc, c, t, j, L, rw_ptr, cw_ptr, TRANSFORM)
            else:
                _store(
                    out_ptr, c, stride_slab, stride_t, I, J, r0, r1, c0, c1, acc, Q, J >= 0, ALIGNED, EVICT
                )
            c, c_next = c_next, c_after
            tap0, tap1, tap2, tap3, rt0, rt1, rt2, rt3, left = (
                n_tap0, n_tap1, n_tap2, n_tap3, n_rt0, n_rt1, n_rt2, n_rt3, n_left
            )  # fmt: skip
            p += 1
        return total

    @triton.jit
    def _tap_product(total, cells, x, x_hi, y, taps_ptr, cc, K, k: tl.constexpr, right_ptr, cols, ok,
                     SPLIT: tl.constexpr):  # fmt: skip
        """``total`` plus window ``k`` (``cells + k``) times ``X Y_kᵀ``, ``Y_k = y · tap_k · r[j + k]``
        (:func:`_head_product_sums`; ``ok``: where ``r[j + k]`` exists)."""
        y_k = y * _tap(taps_ptr, cc, K, k)[None, :] * tl.load(right_ptr + cols + k, mask=ok, other=0.0)
        return total + tl.load(cells + k) * _split_product(x, x_hi, y_k, SPLIT)

    @triton.jit
    def _head_product_sums(total, cells, t, j, L, p, end, chan_ptr, taps_ptr, K, right_ptr, left_ptr, pm,
                           rw_ptr, cw_ptr, CB: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
        """``total`` plus the signed, weighted sum of one head's channels ``chan[p : end]`` on a tile below
        the diagonal, from the head's windows ``w_k`` (``cells + k`` in the program's scratch,
        :func:`_head_windows`). Channel ``c``'s weighted entry is ``rw_c[t] left_c[t] Σ_k w_k[t, j]
        tap_k(c) r_c[j + k] pm[j] cw_c[j]`` (:func:`_head_channel`, :func:`_reduce_at`), so the sum is
        ``Σ_k w_k ⊙ X Y_kᵀ`` with ``X[t, c] = rw_c[t] left_c[t]`` and ``Y_k[j, c] = cw_c[j] pm[j] tap_k(c)
        r_c[j + k]``: four tensor-core products whose depth is the channels, ``CB`` at a time, where the
        loop takes four multiply-adds, the gate, the weights and a sum an entry a channel. Each window is
        read from the scratch where its product is added: the four held in registers spilled 596 bytes at
        4 warps, 16 deep (120 so; ``benchmarks/kernel_registers.py``). Signed sums only: ``|Σ_k w_k y_k|``
        does not factorise over the channels."""
        t_ok = t < L
        while p < end:
            i = p + tl.arange(0, CB)
            i_ok = i < end
            cc = tl.load(chan_ptr + i, mask=i_ok, other=0)
            rows = cc[None, :] * L + t[:, None]  # (Q, CB)
            r_ok = t_ok[:, None] & i_ok[None, :]
            x = tl.load(left_ptr + rows, mask=r_ok, other=0.0) * _weight(rw_ptr, rows, r_ok)
            x_hi = _tf32_head(x)
            cols = cc[None, :] * L + j[:, None]  # (Q, CB)
            c_ok = (j < L)[:, None] & i_ok[None, :]
            y = _weight(cw_ptr, cols, c_ok) * pm[:, None]
            total = _tap_product(total, cells, x, x_hi, y, taps_ptr, cc, K, 0, right_ptr, cols, c_ok, SPLIT)
            c_ok = c_ok & (j + 1 < L)[:, None]
            total = _tap_product(total, cells, x, x_hi, y, taps_ptr, cc, K, 1, right_ptr, cols, c_ok, SPLIT)
            c_ok = c_ok & (j + 2 < L)[:, None]
            total = _tap_product(total, cells, x, x_hi, y, taps_ptr, cc, K, 2, right_ptr, cols, c_ok, SPLIT)
            c_ok = c_ok & (j + 3 < L)[:, None]
            total = _tap_product(total, cells, x, x_hi, y, taps_ptr, cc, K, 3, right_ptr, cols, c_ok, SPLIT)
            p += CB
        tl.debug_barrier()  # every thread has read the windows before the next head's overwrite them
        return total

    @triton.jit(do_not_specialize=UNSPECIALISED["_head_reduce_kernel"])
    def _head_reduce_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, J0, nI, nJ, L, ssm, n_heads, per_group,
        scratch_ptr, cum_ptr, A_ptr, delta_ptr, B_ptr, C_ptr, chan_ptr, start_ptr, taps_ptr, K, right_ptr,
        left_ptr, D_ptr, skip, pmask_ptr, rw_ptr, cw_ptr,
        N: tl.constexpr, Q: tl.constexpr, H: tl.constexpr, NC: tl.constexpr, SPLIT: tl.constexpr,
        TRANSFORM: tl.constexpr, ALIGNED: tl.constexpr, GROUPED: tl.constexpr, CB: tl.constexpr,
    ):  # fmt: skip
        """Items ``(tile, group)``: the channel sum over the heads ``group · per_group …`` (``per_group`` of
        them) of tile ``I0 + tile // nJ, J0 + tile % nJ``, into slab ``group`` of the output, for ``item =
        program, program + programs, …`` (tiles above the diagonal are zero: skipped). Per head, its windows
        once (:func:`_head_windows`), then its channels: signed sums as four tensor-core products over the
        channels, ``CB`` at a time (:func:`_head_product_sums`), others (``CB = 0``) a channel at a time,
        each channel's entries weighted, transformed and summed in registers (:func:`_head_channels`);
        one store per item. Groups of heads give a
        read of few tiles enough items for every program: one program a tile summed all 1536 channels of
        Mamba-2's 130M layer at L = 512, 36 programs busy (1.13 ms; in 24 groups 0.39 ms). Without
        ``GROUPED`` (one group) it compiles to the kernel before groups, whose time it keeps: item-by-group
        arithmetic in every launch made the one-group sums 2 % slower at L = 4096 and 16k (run SS)."""
        q = tl.arange(0, Q)
        scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * (Q * (Q + H))
        if GROUPED:
            groups = (n_heads + per_group - 1) // per_group
            items = nI * nJ * groups
            slab_stride = stride_slab
        else:  # one group: the kernel a read of many tiles launches compiles as it did before groups
            items = nI * nJ
            slab_stride = 0  # one slab
        item = tl.program_id(0)
        while item < items:
            if GROUPED:
                tile = item // groups
                group = item % groups
                hh = group * per_group
                h_end = tl.minimum((group + 1) * per_group, n_heads)
            else:
                tile = item
                group = tile * 0
                hh = 0
                h_end = n_heads
            I = I0 + tile // nJ
            J = J0 + tile % nJ
            if J <= I:
                t = I * Q + q
                j = J * Q + q
                pm = tl.load(pmask_ptr + j, mask=j < L, other=0.0)
                total = tl.zeros((Q, Q), dtype=tl.float32)
                while hh < h_end:
                    p = tl.load(start_ptr + hh)
                    end = tl.load(start_ptr + hh + 1)
                    if p < end:  # heads without channels in this read are skipped
                        cum_t = tl.load(cum_ptr + hh * L + t, mask=t < L, other=0.0)
                        a = tl.load(A_ptr + hh)
                        d_skip = tl.where(skip != 0, tl.load(D_ptr + hh), 0.0)
                        w0, w1, w2, w3 = _head_windows(
                            I, J, hh, t, t < L, cum_t, a, L, ssm, d_skip, scratch, cum_ptr, delta_ptr, B_ptr,
                            C_ptr, N, Q, H, NC, SPLIT,
                        )  # fmt: skip
                        if CB > 0:  # signed sums: products over the channels
                            cells = scratch + q[:, None] * (Q + H) + q[None, :]  # w0, unread above
                            total = _head_product_sums(
                                total, cells, t, j, L, p, end, chan_ptr, taps_ptr, K, right_ptr, left_ptr, pm,
                                rw_ptr, cw_ptr, CB, SPLIT,
                            )  # fmt: skip
                        else:
                            total = _head_channels(
                                total, w0, w1, w2, w3, I, J, t, j, L, p, end, chan_ptr, taps_ptr, K,
                                right_ptr, left_ptr, pm, out_ptr, slab_stride, stride_t, r0, r1, c0, c1,
                                rw_ptr, cw_ptr, Q, ALIGNED, True, TRANSFORM, 0, 0,
                            )  # fmt: skip
                    hh += 1
                _store(
                    out_ptr, group, slab_stride, stride_t, I, J, r0, r1, c0, c1, total, Q, J >= 0, ALIGNED, 0
                )
            item += tl.num_programs(0)


def _aligned(out: Tensor, c0: int, c1: int, kernel: str) -> int:
    """``ALIGNED`` of :func:`_store_at` for a launch of ``kernel``: its ``TUNING["aligned_run"]`` (entries a
    store may take at once) where the read's first and last columns and the output's row and slab strides
    are multiples of 16 (every dense read from column 0 with ``L`` a multiple of 16), else 0. Two compiled
    variants of a kernel at most, not one per read's offsets."""
    aligned = c0 % 16 == 0 and c1 % 16 == 0 and all(stride % 16 == 0 for stride in out.stride()[:-1])
    return TUNING["aligned_run"][kernel] if aligned else 0


#: the L2 eviction policies a kernel takes (``TUNING["evict"]``), as the kernels' ``EVICT`` constants
EVICTIONS = {"": 0, "evict_first": 1, "evict_last": 2}


def _evict(kernel: str, groups: int) -> dict:
    """The L2 eviction policies of a launch of ``kernel`` (``TUNING["evict"]``): dense reads only (channel
    sums store a tile per group and read their factors as dense reads do)."""
    store, load = TUNING["evict"].get(kernel, ("", "")) if not groups else ("", "")
    return {"EVICT": EVICTIONS[store], **({"LOAD_EVICT": EVICTIONS[load]} if kernel == "head" else {})}


def _split_groups(n: int, items: int, tiles: int) -> tuple[int, int]:
    """``(groups, per_group)``: ``n`` channels (or heads) in about ``items / tiles`` groups, at least one and
    at most ``n``, none empty: a channel sum's launch gets about ``items`` (tile, group) programs, its
    partial sums added up afterwards."""
    groups = max(1, min(n, math.ceil(items / tiles)))
    per_group = math.ceil(n / groups)
    return math.ceil(n / per_group), per_group


def _tile_grid(r0: int, r1: int, c0: int, c1: int) -> tuple[int, int, int, int]:
    """The first row and column tiles of a read ``[r0:r1, c0:c1]`` and how many of each it touches."""
    I0, J0 = r0 // TILE, c0 // TILE
    return I0, J0, (r1 - 1) // TILE - I0 + 1, (c1 - 1) // TILE - J0 + 1


class _Tiles:
    """What the view calls: dense blocks and channel sums of ``n_chan`` prepared channels on ``device``;
    subclasses launch their kernels in ``_launch``."""

    n_chan: int
    device: torch.device

    def _launch(self, out: Tensor, span: tuple[int, int, int, int], groups: int, per_group: int,
                row_weight: Tensor | None = None, col_weight: Tensor | None = None, transform: str = "signed",
                ) -> None:  # fmt: skip
        raise NotImplementedError

    def dense(self, r0: int, r1: int, c0: int, c1: int, out: Tensor | None = None) -> Tensor:
        """Entries ``[:, r0:r1, c0:c1]`` of every prepared channel: ``(nc, r1 − r0, c1 − c0)``."""
        if out is None:
            out = torch.empty(self.n_chan, r1 - r0, c1 - c0, device=self.device, dtype=torch.float32)
        if out.numel() == 0:
            return out
        if out.stride(2) != 1 or tuple(out.shape) != (self.n_chan, r1 - r0, c1 - c0):
            raise ValueError(
                f"out must be a ({self.n_chan}, {r1 - r0}, {c1 - c0}) tensor with unit column stride"
            )
        self._launch(out, (r0, r1, c0, c1), 0, 1)
        return out

    def reduce(
        self,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
        *,
        row_weight: Tensor | None = None,
        col_weight: Tensor | None = None,
        transform: str = "signed",
    ) -> Tensor:
        """The channel sum of (weighted, transformed) entries ``[r0:r1, c0:c1]``: ``(r1 − r0, c1 − c0)``."""
        _, _, nI, nJ = _tile_grid(r0, r1, c0, c1)
        # enough programs to fill the GPU: channel groups when there are few tiles, summed afterwards
        groups, per_group = _split_groups(self.n_chan, TUNING["reduce_items"], nI * nJ)
        out = torch.empty(groups, r1 - r0, c1 - c0, device=self.device, dtype=torch.float32)
        self._launch(out, (r0, r1, c0, c1), groups, per_group, row_weight, col_weight, transform)
        return out.sum(0) if groups > 1 else out[0]


@functools.lru_cache(maxsize=64)
def filled(n: int, value: float, device: torch.device, dtype: torch.dtype = torch.float32, *,
           column: bool = False) -> Tensor:  # fmt: skip
    """A read-only vector of ``n`` copies of ``value`` (with ``column``, a ``(n, 1)`` column), made once per
    length and device: the stand-ins that reads of every length pass to the kernels (segment ids without
    resets, an input mask of ones, RG-LRU's one state) without a fill, nor a view, on every read. Never write
    to it."""
    return torch.full((n, 1) if column else (n,), value, dtype=dtype, device=device)


def _weights(tiles: _Tiles, groups: int, row_weight: Tensor | None, col_weight: Tensor | None, *,
             ones: bool = False) -> tuple:  # fmt: skip
    """The row and column weights of a channel sum (``groups > 0``) as the kernels read them: None where none
    is given, which compiles the sum without that weight's loads and products (:func:`_weight`; a tensor of
    ones was allocated, filled and read every read), or with ``ones`` a tensor of ones, for a kernel whose
    variant without weights runs slower (Mamba-2's signed products: 4–14 %, run VV). A dense read weighs
    nothing, and any tensor stands in (``tiles.pmask``): its kernels compile as before."""
    if not groups:
        return tiles.pmask, tiles.pmask
    absent = None
    if ones and (row_weight is None or col_weight is None):
        absent = torch.ones(tiles.n_chan, tiles.L, device=tiles.device, dtype=torch.float32)
    rw = absent if row_weight is None else _contiguous(row_weight)
    return rw, absent if col_weight is None else _contiguous(col_weight)


class DiagonalTiles(_Tiles):
    """The per-channel arrays the kernels read, for one batch row and a set of channels, of any core of the
    form (per channel, ``N`` diagonal states, every ``A_n ≤ 0``, ``S`` non-decreasing)::

        core[t, m] = [seg_t = seg_m] · Σ_n C[t, n] · exp(A_n (S_{t+1} − S_{m+1})) · w_m B[m, n]  +  D [t = m]

    Mamba-1 (``w = Δ``, ``S = ΣΔ``) and RG-LRU (``N = 1``, ``A = −1``, ``S = −Σ log a``, ``w`` the input
    scale, ``seg`` the reset count) are two instances. Prepared in ``O(channels · L · N)``, in one pass
    (:func:`_prep_kernel`) from the arrays as given: the sums of ``S`` the tiles read, ``W``, ``V`` (and
    ``U`` for ``N < 16``) and ``fix``; ``V`` and ``U`` are the far tiles' factors (the input mask and the
    left factors in them; the far kernel computes ``U`` itself from ``C`` where the tile is one product),
    the rest serves the near tiles (``growth``: the strips'). Besides allocations no torch operation runs
    per read: on the H200's machine each costs the host 10–25 µs inside a read (an allocation 2 µs in a warm
    loop, run FFF), and a short read is issued by the host as much as computed by the device.

    Args:
        S: ``(nc, L + 1)`` float64 cumulative rates, ``S[p + 1] = Σ_{k ≤ p}``, ``S[0] = 0``.
        A: ``(nc, N)`` non-positive rates; ``B``, ``C``: ``(L, N)``; ``weight``: ``(nc, L)``;
            ``D``: ``(nc,)``.
        segment: ``(L,)`` integer, non-decreasing: entries between different segments are zero.
        scalar: every state of a channel has the same rate (``A[:, n] = A[:, 0]``, Mamba-2): the near tiles
            take one exponential per entry and ``C_t · B_m`` as a product (``N`` a power of two ≥ 16).
        left, right, taps, input_mask, ssm, skip: the view's factors (see :meth:`Core.tiles`).
    """

    def __init__(
        self,
        S: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        weight: Tensor,
        D: Tensor | None = None,
        segment: Tensor | None = None,
        *,
        scalar: bool = False,
        left: Tensor | None,
        right: Tensor | None,
        taps: Tensor | None,
        input_mask: Tensor | None,
        ssm: bool,
        skip: bool,
    ):
        f32, Q = torch.float32, TILE
        device = S.device
        nc, L = weight.shape
        nT = (L + Q - 1) // Q
        N = A.shape[1]
        if scalar and (N < 16 or N & (N - 1)):
            raise ValueError(f"the scalar-decay kernel wants a power of two ≥ 16 states, got {N}")
        self.scalar = scalar
        self.far_dot = bool(TUNING["FAR_DOT"]) and N >= 16
        # tl.dot wants a power of two ≥ 16 (zero padding); outer products take N as it is
        NP = max(16, 1 << (N - 1).bit_length()) if self.far_dot else N
        K = 1 if taps is None else taps.shape[1]
        if K - 1 > Q:
            raise ValueError(f"the fused kernel handles convolutions of up to {Q + 1} taps, got {K}")
        # the sums of S the tiles read (written by the preparation: no torch operation per read)
        self.sloc = torch.empty(nc, L, device=device, dtype=f32)  # Σ over the tile, through p
        self.sb = torch.empty(nc, nT + 1, device=device, dtype=S.dtype)  # S at tile starts (and at L)
        self.tot = torch.empty(nc, nT, device=device, dtype=f32)
        self.sref = torch.empty(nc, nT, device=device, dtype=S.dtype)  # the far tiles' column reference
        # each strip's growth, and its diagonal block's
        self.growth = torch.empty(nc, (L + STRIP - 1) // STRIP, 2, device=device, dtype=f32)
        self.segments = segment is not None
        if segment is None:
            self.seg, self.seg_ref = filled(L, 0, device, torch.int32), filled(nT, 0, device, torch.int32)
        else:  # seg_ref: the segment of each tile's last column
            self.seg = _contiguous(segment, torch.int32)
            self.seg_ref = torch.empty(nT, device=device, dtype=torch.int32)
        weight = _contiguous(weight)
        right = weight if right is None else _contiguous(right)  # unread without has_right
        skip = skip and D is not None
        D = _contiguous(D) if skip else weight  # unread without skip
        self.A = _contiguous(A)
        self.B = _contiguous(B)
        self.C_rows = C = _contiguous(C)  # row-major: the far tiles' U (:func:`_far_rows`)
        self.taps = torch.ones(nc, 1, device=device, dtype=f32) if taps is None else _contiguous(taps)
        self.left = torch.ones(nc, L, device=device, dtype=f32) if left is None else _contiguous(left)
        self.pmask = filled(L, 1.0, device) if input_mask is None else _contiguous(input_mask)
        self.N, self.NP, self.K, self.L, self.ssm = N, NP, K, L, ssm
        self.n_chan, self.device = nc, device
        # W, C, V (and U): written by the preparation with the recurrence; without it unread (sloc stands in)
        # W and C state-major: a state's entries of consecutive positions in one run, for the loads of one
        # state at a time (:func:`_direct`; a sector per entry row-major)
        self.W = torch.empty(nc, N, L, device=device, dtype=f32) if ssm else self.sloc
        self.C = torch.empty(N, L, device=device, dtype=f32) if ssm else self.sloc
        self.V = torch.empty(nc, L, NP, device=device, dtype=f32) if ssm else self.sloc
        # U: prepared for the outer products only (:func:`_far_rows` computes the tile product's)
        self.U = torch.empty_like(self.V) if ssm and not self.far_dot else self.sloc
        self.fix = torch.empty(nc, L, K, device=device, dtype=f32)
        # positions a program: a (P, NP) tile of every factor
        P = max(16, min(TUNING["prep_positions"], TUNING["prep_elements"] // NP))
        prep_kind = "prep_outer" if not self.far_dot else "prep_wide" if NP >= 64 else "prep"
        _prep_kernel[(nc, triton.cdiv(L, P))](
            _contiguous(S, S.dtype), self.A, self.B, C, weight, right, D, self.taps, self.seg, self.seg_ref,
            self.left, self.pmask, self.sloc, self.sb, self.tot, self.sref, self.growth, self.U, self.V,
            self.W, self.C, self.fix,
            L, int(ssm), int(skip), int(right is not weight), int(segment is not None),
            N=N, NP=NP, K=K, KP=triton.next_power_of_2(K), Q=Q, P=P, SQ=STRIP, ROWS=not self.far_dot,
            **_options(prep_kind, max(TUNING["prep_warps"], 4 if NP >= 64 else 1), False),
        )  # fmt: skip
        # near tiles by strips where the far tiles take a product (Mamba-1) and the conv fits in a strip
        self.strips = bool(TUNING["NEAR_STRIPS"]) and self.far_dot and not scalar and ssm and K - 1 < STRIP

    def _product_channels(self) -> int:
        """Channels one tensor-core product of a channel sum's far tiles takes: ``rank_one_channels`` of one
        state (:func:`_rank_one_sums`), enough for a depth of ``far_sum_depth`` of tile products
        (:func:`_far_product_sums`; 1: a channel at a time, :func:`_far_sums`)."""
        if self.N == 1:
            return TUNING["rank_one_channels"]
        return max(1, TUNING["far_sum_depth"] // self.NP) if self.far_dot else 1

    def _launch(self, out: Tensor, span: tuple[int, int, int, int], groups: int, per_group: int,
                row_weight: Tensor | None = None, col_weight: Tensor | None = None, transform: str = "signed",
                ) -> None:  # fmt: skip
        r0, r1, c0, c1 = span
        I0, J0, nI, nJ = _tile_grid(*span)
        aligned = _aligned(out, c0, c1, "tiles")
        reduce = dict(REDUCE=groups > 0, TRANSFORM=TRANSFORMS[transform], ALIGNED=aligned)
        slabs = groups or self.n_chan
        rw, cw = _weights(self, groups, row_weight, col_weight)
        head = (out, out.stride(0), out.stride(1), r0, r1, c0, c1)
        span = 1 if groups else nJ  # dense: one program per row tile; reduce: per tile, for parallelism
        # wide states (Mamba-2's N = 128) take 8 warps whatever TUNING says: 4 spill registers
        far_warps = max(TUNING["far_warps"], 8 if self.NP >= 64 else 1)
        far_kind = "far_outer" if not self.far_dot else "far_wide" if self.NP >= 64 else "far"
        narrow = out.element_size() == 2 and not groups  # a dense read stored in 16 bits
        if narrow and far_kind in TUNING["narrow_warps"]:
            far_warps = TUNING["narrow_warps"][far_kind]
        # dense reads by strips: the far kernel's programs take their row tile's near tiles too, and (without
        # resets) tile I − 1 into the far product where the growth allows
        strips = self.strips and bool(TUNING["NEAR_STRIPS"]) and not groups
        short = strips and narrow and nJ <= TUNING["short_tiles"]  # its own registers and unrolled strips
        far_options = _options("far_short" if short else far_kind, far_warps, groups > 0)
        near_far = int(strips and not self.segments)
        KP = triton.next_power_of_2(self.K)
        split = bool(TUNING["FAR_SPLIT_TF32"])
        # (measured for Mamba-1's 16 states; wide states would hold Q × NP more registers a tile)
        ahead = out.element_size() in TUNING["far_ahead"] and self.NP < 64
        _far_kernel[(nI, triton.cdiv(nJ, span), slabs)](
            *head, I0, J0, nJ, span, self.L, int(self.ssm), self.n_chan, per_group,
            self.sb, self.sref, self.A, self.U, self.V, self.left, self.pmask, self.seg, self.seg_ref, rw, cw,
            self.growth, float(STRIP_GROWTH), near_far, self.fix, self.sloc, self.tot, self.C, self.C_rows,
            self.W,
            N=self.N, NP=self.NP, Q=TILE, FAR_DOT=self.far_dot, SPLIT=split, K=self.K, KP=KP, SQ=STRIP,
            STRIPS=strips, CB=self._product_channels(), AHEAD=ahead, UNROLL=2 if short else 1,
            PREFETCH=strips and bool(TUNING["NEAR_PREFETCH"]),
            **_evict(far_kind + "_strips" if strips else far_kind, groups), **far_options, **reduce,
        )  # fmt: skip
        if strips:
            return
        if self.strips and TUNING["NEAR_STRIPS"]:  # channel sums of the near tiles: a strip's rows a program
            _strip_kernel[(nI * (TILE // STRIP), 2, slabs)](
                *head, I0, self.L, int(self.ssm), self.n_chan, per_group, float(STRIP_GROWTH),
                self.sloc, self.tot, self.growth, self.A, self.C, self.W, self.fix, self.seg, self.left,
                self.pmask, rw, cw, N=self.N, NP=self.NP, K=self.K, KP=KP, Q=TILE, SQ=STRIP, SPLIT=split,
                TRANSFORM=TRANSFORMS[transform], ALIGNED=aligned,
                **_options("strip", TUNING["near_warps"], True),
            )  # fmt: skip
            return
        near_warps = max(TUNING["near_warps"], 8 if self.scalar else 1)
        near_kind = "near_scalar" if self.scalar else "near"
        if narrow and near_kind in TUNING["narrow_warps"]:
            near_warps = TUNING["narrow_warps"][near_kind]
        near_options = _options(near_kind, near_warps, groups > 0)
        near_head, near_groups, near_per_group = head, slabs, per_group
        if groups:  # channel sums: the near tiles' own channel groups (2 tiles a row tile, where the far
            # kernel's groups count every tile: too few programs), into a buffer of whole tiles, added up
            near_groups, near_per_group = _split_groups(self.n_chan, TUNING["near_reduce_items"], 2 * nI)
            parts = torch.empty(near_groups, nI, 2, TILE, TILE, device=self.device, dtype=torch.float32)
            near_head = (parts, 0, 0, r0, r1, c0, c1)
        _near_kernel[(nI, 2, near_groups)](
            *near_head, I0, self.L, int(self.ssm), self.n_chan, near_per_group,
            self.sloc, self.tot, self.A, self.C, self.W, self.fix, self.seg, self.left, self.pmask, rw, cw,
            N=self.N, K=self.K, KP=KP, Q=TILE, SCALAR=self.scalar,
            **_evict(near_kind, groups), **near_options, **reduce,
        )  # fmt: skip
        if groups:
            _near_sum_kernel[(nI, 2, slabs)](*head, I0, parts, near_groups, Q=TILE, ALIGNED=aligned)


class WKVTiles(_Tiles):
    """The normalised WKV of RWKV-4 (``families/rwkv4.py``) for one batch row and a set of channels::

        R[t, j] = left[t] · exp(w · (j − t) + k_j + w − log Z_t) · right[j] p[j]   (j < t)
        R[t, t] = left[t] · exp(u + k_t − log Z_t) · right[t] p[t]

    from the core's float64 ``key`` and ``log_z`` (``(nc, L)``) and ``w``, ``u`` (``(nc,)``), as they are:
    the exponent is summed in float64 and only then rounded, so keys and normalisers in the hundreds keep
    float32 precision. One exponential per entry, no preparation and no torch operation per read.
    """

    def __init__(self, key: Tensor, log_z: Tensor, w: Tensor, u: Tensor, *, left: Tensor | None,
                 right: Tensor | None, input_mask: Tensor | None, ssm: bool = True):  # fmt: skip
        self.n_chan, self.L = key.shape
        self.device, self.ssm = key.device, ssm
        self.key, self.log_z, self.w, self.u = (_contiguous(x, torch.float64) for x in (key, log_z, w, u))
        # without a factor, every channel reads one shared vector of ones (stride 0)
        ones = filled(self.L, 1.0, self.device)
        self.left = ones if left is None else _contiguous(left)
        self.right = ones if right is None else _contiguous(right)
        self.strides = (0 if left is None else self.L, 0 if right is None else self.L)
        mask = input_mask
        self.pmask = filled(self.L, 1.0, self.device) if mask is None else _contiguous(mask)

    def _launch(self, out: Tensor, span: tuple[int, int, int, int], groups: int, per_group: int,
                row_weight: Tensor | None = None, col_weight: Tensor | None = None, transform: str = "signed",
                ) -> None:  # fmt: skip
        if not self.ssm:  # the view without the recurrence: zeros
            out.zero_()
            return
        r0, r1, c0, c1 = span
        I0, J0, nI, nJ = _tile_grid(*span)
        rw, cw = _weights(self, groups, row_weight, col_weight)
        run = 1 if groups else nJ
        _wkv_kernel[(nI, triton.cdiv(nJ, run), groups or self.n_chan)](
            out, out.stride(0), out.stride(1), r0, r1, c0, c1, I0, J0, nJ, run, self.L, self.n_chan,
            per_group, self.key, self.log_z, self.w, self.u, self.left, self.right, self.pmask, rw, cw,
            *self.strides, Q=TILE, REDUCE=groups > 0, TRANSFORM=TRANSFORMS[transform],
            ALIGNED=_aligned(out, c0, c1, "wkv"), CB=TUNING["wkv_sum_channels"] if groups else 0,
            SPLIT=bool(TUNING["FAR_SPLIT_TF32"]), **_evict("wkv", groups),
            **_options("wkv", TUNING["wkv_warps"], groups > 0),
        )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _run_by_head(first: int, n: int, per_head: int, n_heads: int, device: torch.device) -> tuple[Tensor, ...]:
    """:class:`HeadTiles`' channel order and head bounds for the run of ``n`` channels from ``first``, whose
    head is ``channel // per_head``: made once per layout, read-only, on the device (a copy from the host
    would wait for it)."""
    heads = torch.arange(n_heads + 1, device=device, dtype=torch.int32)
    bounds = (heads * per_head - first).clamp_(0, n)
    return torch.arange(n, device=device, dtype=torch.int32), bounds


class HeadTiles(_Tiles):
    """Dense blocks and channel sums of Mamba-2 channels by head: the channels of a head share their core
    ``R_h[t, m] = C_t · B_m · exp(a_h Σ_{m<k≤t} Δ_k) · Δ_m`` and differ only by their conv taps, right,
    left and skip factors, so each tile of ``R_h`` (with a halo of 16 columns) is computed once, with one
    product over the states, and every channel applies its conv (up to ``HEAD_TAPS = 4`` taps) as four
    multiply-adds of shifted windows of it held in registers (:func:`_head_kernel`). Channel sums take the
    same windows and sum the channels' entries in registers, one store per tile
    (:func:`_head_reduce_kernel`; signed sums as products over a head's channels), so they never hold
    ``channels × L × L`` either.

    Args:
        cum: ``(nh, L)`` float64 ``Σ_{k≤t} Δ_k`` of each head; ``A``: ``(nh,)``; ``delta``: ``(nh, L)``;
            ``B``, ``C``: ``(L, N)`` of the heads' group; ``head_index``: ``(nc,)`` the head of each
            channel (rows of ``cum``; heads without channels in the read cost nothing); ``D``: ``(nh,)``
            (the skip of each head) or None.
        run: ``(first, n, per_head)``: the read's channels are the run of ``n`` from ``first`` and channel
            ``c`` is in head ``c // per_head`` (``head_index`` unread): their order by head follows from the
            layout, made once per layout, with no sort.
        left, right, taps, input_mask, ssm, skip: the view's factors (see :meth:`Core.tiles`).
    """

    def __init__(self, cum: Tensor, A: Tensor, delta: Tensor, B: Tensor, C: Tensor, head_index: Tensor | None,
                 D: Tensor | None, *, left: Tensor | None, right: Tensor | None, taps: Tensor | None,
                 input_mask: Tensor | None, ssm: bool, skip: bool, run: tuple[int, int, int] | None = None,
                 ):  # fmt: skip
        f32, device = torch.float32, cum.device
        n_heads, L = cum.shape
        self.n_chan = nc = run[1] if run is not None else len(head_index)
        self.device, self.L, self.ssm = device, L, ssm
        self.cum = _contiguous(cum, torch.float64)
        self.A, self.delta = _contiguous(A), _contiguous(delta)
        self.B, self.C = _contiguous(B), _contiguous(C)
        # the read's channels (positions into it) head by head: head h's are chans[starts[h] : starts[h + 1]]
        if run is not None:  # from the layout, once per layout (a sort and a search cost 0.1 ms a read)
            self.chans, self.starts = _run_by_head(*run, n_heads, device)
        else:  # sorted and searched on the device: nothing here waits for it
            head_index = head_index.long()
            order = torch.argsort(head_index, stable=True)
            self.chans = _contiguous(order, torch.int32)
            bounds = torch.arange(n_heads + 1, device=device)
            self.starts = torch.searchsorted(head_index[order], bounds).to(torch.int32).contiguous()
        ones = torch.ones(nc, L, device=device, dtype=f32) if left is None or right is None else None
        self.left = ones if left is None else _contiguous(left)
        self.right = ones if right is None else _contiguous(right)
        taps = filled(nc, 1.0, device, column=True) if taps is None else _contiguous(taps)
        if taps.shape[1] > HEAD_TAPS:
            raise ValueError(f"the by-head kernel handles convolutions of up to {HEAD_TAPS} taps")
        self.taps, self.K = taps, taps.shape[1]
        self.skip = int(skip and D is not None)
        self.D = _contiguous(D) if self.skip else self.A  # (n_heads,); unread without skip
        self.pmask = filled(L, 1.0, device) if input_mask is None else _contiguous(input_mask)
        self.n_heads, self.N = n_heads, B.shape[1]

    def _programs(self, per_sm: int) -> int:
        """Programs the device runs at once, ``per_sm`` an SM (two under the interpreter, so that tests take
        the loops over items and tiles too)."""
        if self.device.type != "cuda":
            return 2
        return per_sm * torch.cuda.get_device_properties(self.device).multi_processor_count

    def _launch(self, out: Tensor, span: tuple[int, int, int, int], groups: int, per_group: int,
                row_weight: Tensor | None = None, col_weight: Tensor | None = None, transform: str = "signed",
                ) -> None:  # fmt: skip
        r0, r1, c0, c1 = span
        I0, J0, nI, nJ = _tile_grid(*span)
        programs = max(1, min(nI * nJ * self.n_heads, self._programs(TUNING["head_programs_per_sm"])))
        scratch = torch.empty(programs, TILE, TILE + HEAD_HALO, device=self.device)
        _head_kernel[(programs,)](
            out, out.stride(0), out.stride(1), r0, r1, c0, c1, I0, J0, nI, nJ, self.L, int(self.ssm),
            self.n_heads,
            scratch, self.cum, self.A, self.delta, self.B, self.C, self.chans, self.starts, self.taps, self.K,
            self.right, self.left, self.D, self.skip, self.pmask, N=self.N, Q=TILE, H=HEAD_HALO, NC=16,
            SPLIT=bool(TUNING["FAR_SPLIT_TF32"]), ALIGNED=_aligned(out, c0, c1, "head"), **_evict("head", 0),
            **_options("head", TUNING["head_warps"], False),
        )  # fmt: skip

    def reduce(
        self,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
        *,
        row_weight: Tensor | None = None,
        col_weight: Tensor | None = None,
        transform: str = "signed",
    ) -> Tensor:
        """The channel sum of (weighted, transformed) entries ``[r0:r1, c0:c1]``, by head
        (:func:`_head_reduce_kernel`): ``(r1 − r0, c1 − c0)``. A read of few tiles splits the heads into
        groups, one slab of partial sums each, summed afterwards (as :meth:`_Tiles.reduce` splits
        channels)."""
        if (r1 - r0) * (c1 - c0) == 0 or self.n_chan == 0:
            return torch.zeros(r1 - r0, c1 - c0, device=self.device, dtype=torch.float32)
        I0, J0, nI, nJ = _tile_grid(r0, r1, c0, c1)
        groups, per_group = _split_groups(self.n_heads, TUNING["head_reduce_items"], nI * nJ)
        out = torch.zeros(groups, r1 - r0, c1 - c0, device=self.device, dtype=torch.float32)
        depth = TUNING["head_sum_depth"] if transform == "signed" else 0  # products: signed sums only
        # the products read ones where no weights are given (their loads rescheduled without: slower);
        # the loop none (20–24 % faster, run VV)
        rw, cw = _weights(self, 1, row_weight, col_weight, ones=depth > 0)
        programs = max(1, min(nI * nJ * groups, self._programs(TUNING["head_reduce_programs_per_sm"])))
        scratch = torch.empty(programs, TILE, TILE + HEAD_HALO, device=self.device)
        warps = TUNING["head_product_warps"] if depth else TUNING["head_reduce_warps"]
        _head_reduce_kernel[(programs,)](
            out, out.stride(0), out.stride(1), r0, r1, c0, c1, I0, J0, nI, nJ, self.L, int(self.ssm),
            self.n_heads, per_group, scratch, self.cum, self.A, self.delta, self.B, self.C, self.chans,
            self.starts, self.taps, self.K, self.right, self.left, self.D, self.skip, self.pmask, rw, cw,
            N=self.N, Q=TILE, H=HEAD_HALO, NC=16,
            SPLIT=bool(TUNING["FAR_SPLIT_TF32"]), TRANSFORM=TRANSFORMS[transform],
            ALIGNED=_aligned(out, c0, c1, "head"), GROUPED=groups > 1,
            CB=depth, **_options("head", warps, True),
        )  # fmt: skip
        return out.sum(0) if groups > 1 else out[0]
