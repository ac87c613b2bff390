"""Fused Triton assembly of diagonal-state implicit attention (Mamba-1, RG-LRU, Mamba-2): dense blocks
and channel reductions.

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

      A[t, j] = g[t] p[j] · Σ_n U[t, n] · exp(A_n (S_{IQ} − S_ref(J))) · V[j, n]
      U[t, n] = C[t, n] exp(A_n (S_{t+1} − S_{IQ})),
      V[j, n] = Σ_k w_k exp(A_n (S_ref(J) − S_{j+k+1})) u_{j+k} r_{j+k} B[j+k, n],   S_ref(J) = S_{(J+1)Q+K−1}

  (``U`` and ``V``, ``O(L·N)`` per channel, are prepared in torch; the tile is one ``Q×N×Q`` product);
* **near tiles** (``I ∈ {J, J+1}``): the core over the tile's columns plus a halo of 16 (the conv's
  reach) from one exponential per entry and state, gaps from per-tile local sums (float32 of small
  numbers), then the conv as a product with the banded Toeplitz of the taps;
* tiles above the diagonal are zeros.

Matrix products run in IEEE float32 (no TF32); ``exp`` is the GPU's fast one: the result matches the torch
path to ≤ 1e-5 relative. Two launches per read, so that each kernel keeps its own registers: one for the far
tiles (and the zeros above the diagonal), one for the near tiles. :meth:`DiagonalTiles.dense` writes
``(channels, rows, cols)``; :meth:`DiagonalTiles.reduce` sums channels inside each program (with optional
row/column weights and the ``abs``/``positive`` transforms) and writes one ``(rows, cols)`` per channel
group, so a channel mean never holds ``channels × L × L``. Measured on the H200
(``benchmarks/results/gpu.md``): 18× / 11× / 7.2× the write floor at L = 512 / 1024 / 2048 for 1536
channels, against 1183× / 1423× for the torch path; the near tiles' exponentials and the fp32 (non-tensor-
core) products keep it from the floor.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # optional: the torch path serves wherever Triton is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

#: tile size (rows and columns) and the halo of conv columns a near tile computes (conv width ≤ 17).
TILE = 64
HALO = 16
TRANSFORMS = {"signed": 0, "abs": 1, "positive": 2}
#: code paths and launch settings (benchmarks/bench_kernel.py compares them): the far tiles as one tile
#: product (``FAR_DOT``) or ``N`` outer products, the near tiles' conv as a banded product (``NEAR_DOT``) or
#: ``K`` shifted cores.
TUNING: dict = {"FAR_DOT": True, "NEAR_DOT": True, "far_warps": 8, "near_warps": 8}


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

    @triton.jit
    def _near_core(
        c, I, t, m, L, n_tiles, ssm, sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr, vr_ptr, dr_ptr, seg_ptr,
        N: tl.constexpr, Q: tl.constexpr, SCALAR: tl.constexpr,
    ):  # fmt: skip
        """``core[t, m]`` for rows ``t`` of tile ``I`` and columns ``m`` in tiles ``I − 1 … I + 1``."""
        t_ok = t < L
        m_ok = (m >= 0) & (m < L)
        seg_t = tl.load(seg_ptr + t, mask=t_ok, other=0)
        seg_m = tl.load(seg_ptr + m, mask=m_ok, other=-1)
        valid = (
            (m[None, :] <= t[:, None]) & m_ok[None, :] & t_ok[:, None] & (seg_t[:, None] == seg_m[None, :])
        )
        tile_m = m // Q
        s_t = tl.load(sloc_ptr + c * L + t, mask=t_ok, other=0.0)
        s_m = tl.load(sloc_ptr + c * L + m, mask=m_ok, other=0.0)
        carry = tl.load(tot_ptr + c * n_tiles + tile_m, mask=m_ok & (tile_m < I), other=0.0)
        gap = s_t[:, None] - (s_m - carry)[None, :]
        gap = tl.where(valid, tl.maximum(gap, 0.0), 0.0)
        acc = tl.zeros_like(gap)
        if ssm != 0:
            if SCALAR:  # one decay for every state (Mamba-2): exp once per entry, C_t · B_m as a product
                n = tl.arange(0, N)
                c_rows = tl.load(C_ptr + t[:, None] * N + n[None, :], mask=t_ok[:, None], other=0.0)
                b_rows = tl.load(B_ptr + m[:, None] * N + n[None, :], mask=m_ok[:, None], other=0.0)
                scores = tl.dot(c_rows, tl.trans(b_rows), input_precision="ieee")
                acc = scores * tl.exp(tl.load(A_ptr + c * N) * gap)
            else:
                for n in tl.static_range(N):
                    a_n = tl.load(A_ptr + c * N + n)
                    c_n = tl.load(C_ptr + t * N + n, mask=t_ok, other=0.0)
                    b_n = tl.load(B_ptr + m * N + n, mask=m_ok, other=0.0)
                    acc += c_n[:, None] * tl.exp(a_n * gap) * b_n[None, :]
            vr = tl.load(vr_ptr + c * L + m, mask=m_ok, other=0.0)
            acc = tl.where(valid, acc * vr[None, :], 0.0)
        dr = tl.load(dr_ptr + c * L + m, mask=m_ok, other=0.0)  # zeros without the skip
        diagonal = (t[:, None] == m[None, :]) & m_ok[None, :] & t_ok[:, None]
        return acc + tl.where(diagonal, dr[None, :], 0.0)

    @triton.jit
    def _band(c, m, j, taps_ptr, K: tl.constexpr):
        """The conv as a matrix: ``W[m, j] = w_{m−j}`` for ``0 ≤ m − j < K`` (``w_k = taps[c, K−1−k]``)."""
        k = m[:, None] - j[None, :]
        inside = (k >= 0) & (k < K)
        return tl.load(taps_ptr + c * K + (K - 1 - k), mask=inside, other=0.0)

    @triton.jit
    def _outer(c, I, J, L, sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, left_ptr, pmask_ptr, seg_ptr, segref_ptr,
               N: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr, FAR_DOT: tl.constexpr):  # fmt: skip
        """A far tile (``I ≥ J + 2``) of channel ``c``: ``U · diag(mid) · Vᵀ`` with the left/right masks."""
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        t_ok = t < L
        j_ok = j < L
        n_tiles = (L + Q - 1) // Q
        gap = (tl.load(sb_ptr + c * (n_tiles + 1) + I) - tl.load(sref_ptr + c * n_tiles + J)).to(tl.float32)
        if FAR_DOT:
            n = tl.arange(0, NP)
            u = tl.load(U_ptr + (c * L + t[:, None]) * NP + n[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(V_ptr + (c * L + j[:, None]) * NP + n[None, :], mask=j_ok[:, None], other=0.0)
            a = tl.load(A_ptr + c * N + n, mask=n < N, other=0.0)
            mid = tl.exp(a * gap)  # (NP,), every exponent ≤ 0
            acc = tl.dot(u * mid[None, :], tl.trans(v), input_precision="ieee")
        else:
            acc = tl.zeros((Q, Q), dtype=tl.float32)
            for n in tl.static_range(N):
                mid_n = tl.exp(tl.load(A_ptr + c * N + n) * gap)
                u_n = tl.load(U_ptr + (c * L + t) * NP + n, mask=t_ok, other=0.0)
                v_n = tl.load(V_ptr + (c * L + j) * NP + n, mask=j_ok, other=0.0)
                acc += (u_n * mid_n)[:, None] * v_n[None, :]
        # one segment from the column tile's reference to the row tile's start (U and V check the ends)
        linked = tl.load(seg_ptr + I * Q - 1) == tl.load(segref_ptr + J)
        left = tl.load(left_ptr + c * L + t, mask=t_ok, other=0.0)
        acc = acc * left[:, None] * tl.load(pmask_ptr + j, mask=j_ok, other=0.0)[None, :]
        return tl.where(linked, acc, 0.0)

    @triton.jit
    def _near(c, I, J, L, ssm, sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr, vr_ptr, dr_ptr, seg_ptr, taps_ptr,
              left_ptr, pmask_ptr, N: tl.constexpr, K: tl.constexpr, Q: tl.constexpr, H: tl.constexpr,
              NEAR_DOT: tl.constexpr, SCALAR: tl.constexpr):  # fmt: skip
        """A near tile (``I ∈ {J, J + 1}``) of channel ``c``: the core with its conv halo, then the conv."""
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        n_tiles = (L + Q - 1) // Q
        if NEAR_DOT:
            core = _near_core(c, I, t, j, L, n_tiles, ssm, sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr, vr_ptr,
                              dr_ptr, seg_ptr, N, Q, SCALAR)  # fmt: skip
            acc = tl.dot(core, _band(c, j, j, taps_ptr, K), input_precision="ieee")
            if K > 1:
                h = (J + 1) * Q + tl.arange(0, H)
                core_h = _near_core(c, I, t, h, L, n_tiles, ssm, sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr,
                                    vr_ptr, dr_ptr, seg_ptr, N, Q, SCALAR)  # fmt: skip
                acc += tl.dot(core_h, _band(c, h, j, taps_ptr, K), input_precision="ieee")
        else:
            acc = tl.zeros((Q, Q), dtype=tl.float32)
            for k in tl.static_range(K):
                core = _near_core(c, I, t, j + k, L, n_tiles, ssm, sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr,
                                  vr_ptr, dr_ptr, seg_ptr, N, Q, SCALAR)  # fmt: skip
                acc += tl.load(taps_ptr + c * K + (K - 1 - k)) * core
        left = tl.load(left_ptr + c * L + t, mask=t < L, other=0.0)
        return acc * left[:, None] * tl.load(pmask_ptr + j, mask=(j >= 0) & (j < L), other=0.0)[None, :]

    @triton.jit
    def _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, acc, Q: tl.constexpr, keep):
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        inside = ((t >= r0) & (t < r1))[:, None] & ((j >= c0) & (j < c1))[None, :]
        inside = tl.where(keep, inside, False)  # a scalar condition: where(), not &, for every Triton
        rows = (t - r0).to(tl.int64)  # offsets past 2^31 elements at long lengths
        ptr = out_ptr + slab.to(tl.int64) * stride_slab + rows[:, None] * stride_t + (j - c0)[None, :]
        tl.store(ptr, acc, mask=inside)

    @triton.jit
    def _reduce_step(total, acc, c, I, J, L, rw_ptr, cw_ptr, TRANSFORM: tl.constexpr, Q: tl.constexpr):
        t = I * Q + tl.arange(0, Q)
        j = J * Q + tl.arange(0, Q)
        acc = acc * tl.load(rw_ptr + c * L + t, mask=t < L, other=0.0)[:, None]
        acc = acc * tl.load(cw_ptr + c * L + j, mask=j < L, other=0.0)[None, :]
        if TRANSFORM == 1:
            acc = tl.abs(acc)
        elif TRANSFORM == 2:
            acc = tl.maximum(acc, 0.0)
        return total + acc

    # lengths and offsets change with every read: one compiled kernel for all of them
    _RUNTIME = [
        "stride_slab",
        "stride_t",
        "r0",
        "r1",
        "c0",
        "c1",
        "I0",
        "J0",
        "L",
        "ssm",
        "n_chan",
        "per_group",
    ]

    @triton.jit(do_not_specialize=_RUNTIME)
    def _far_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, J0, L, ssm, n_chan, per_group,
        sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, left_ptr, pmask_ptr, seg_ptr, segref_ptr, rw_ptr, cw_ptr,
        N: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr, FAR_DOT: tl.constexpr,
        REDUCE: tl.constexpr, TRANSFORM: tl.constexpr,
    ):  # fmt: skip
        """Every tile but the near ones: far tiles computed, tiles above the diagonal zeros. Dense: one
        program per tile and channel; reduce: one per tile and group of ``per_group`` channels."""
        I = I0 + tl.program_id(0)
        J = J0 + tl.program_id(1)
        slab = tl.program_id(2)
        far = (I >= J + 2) & (ssm != 0)
        total = tl.zeros((Q, Q), dtype=tl.float32)
        if REDUCE:
            if far:
                c = slab * per_group
                while c < (slab + 1) * per_group:  # while: Triton's interpreter cannot range() over arguments
                    acc = _outer(c, I, J, L, sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, left_ptr, pmask_ptr,
                                 seg_ptr, segref_ptr, N, NP, Q, FAR_DOT)  # fmt: skip
                    total = _reduce_step(total, tl.where(c < n_chan, acc, 0.0), c, I, J, L, rw_ptr, cw_ptr,
                                         TRANSFORM, Q)  # fmt: skip
                    c += 1
        elif far:
            total = _outer(slab, I, J, L, sb_ptr, sref_ptr, A_ptr, U_ptr, V_ptr, left_ptr, pmask_ptr,
                           seg_ptr, segref_ptr, N, NP, Q, FAR_DOT)  # fmt: skip
        not_near = (I < J) | (I >= J + 2)  # the near tiles are the other launch's
        _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, total, Q, not_near)

    @triton.jit(do_not_specialize=[name for name in _RUNTIME if name != "J0"])
    def _near_kernel(
        out_ptr, stride_slab, stride_t, r0, r1, c0, c1, I0, L, ssm, n_chan, per_group,
        sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr, vr_ptr, dr_ptr, seg_ptr, taps_ptr, left_ptr, pmask_ptr,
        rw_ptr, cw_ptr,
        N: tl.constexpr, K: tl.constexpr, Q: tl.constexpr, H: tl.constexpr, NEAR_DOT: tl.constexpr,
        SCALAR: tl.constexpr, REDUCE: tl.constexpr, TRANSFORM: tl.constexpr,
    ):  # fmt: skip
        """The near tiles: row tile ``I`` against column tiles ``I`` and ``I − 1``."""
        I = I0 + tl.program_id(0)
        J = I - tl.program_id(1)
        slab = tl.program_id(2)
        total = tl.zeros((Q, Q), dtype=tl.float32)
        if J < 0:  # row tile 0 has no column tile before it
            pass
        elif REDUCE:
            c = slab * per_group
            while c < (slab + 1) * per_group:
                acc = _near(c, I, J, L, ssm, sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr, vr_ptr, dr_ptr, seg_ptr,
                            taps_ptr, left_ptr, pmask_ptr, N, K, Q, H, NEAR_DOT, SCALAR)  # fmt: skip
                total = _reduce_step(total, tl.where(c < n_chan, acc, 0.0), c, I, J, L, rw_ptr, cw_ptr,
                                     TRANSFORM, Q)  # fmt: skip
                c += 1
        else:
            total = _near(slab, I, J, L, ssm, sloc_ptr, tot_ptr, A_ptr, B_ptr, C_ptr, vr_ptr, dr_ptr, seg_ptr,
                          taps_ptr, left_ptr, pmask_ptr, N, K, Q, H, NEAR_DOT, SCALAR)  # fmt: skip
        _store(out_ptr, slab, stride_slab, stride_t, I, J, r0, r1, c0, c1, total, Q, J >= 0)


class DiagonalTiles:
    """The per-channel arrays the kernels read, for one batch row and a set of channels, of any core of the
    form (per channel, ``N`` diagonal states, every ``A_n ≤ 0``, ``S`` non-decreasing)::

        core[t, m] = [seg_t = seg_m] · Σ_n C[t, n] · exp(A_n (S_{t+1} − S_{m+1})) · w_m B[m, n]  +  D [t = m]

    Mamba-1 (``w = Δ``, ``S = ΣΔ``) and RG-LRU (``N = 1``, ``A = −1``, ``S = −Σ log a``, ``w`` the input
    scale, ``seg`` the reset count) are two instances. Built in torch (``O(channels · L · N)``); ``U`` and
    ``V`` are the far tiles' factors, the rest serves the near tiles.

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
        if K - 1 > HALO:
            raise ValueError(f"the fused kernel handles convolutions of up to {HALO + 1} taps, got {K}")
        pos = torch.arange(L, device=device)
        start = pos // Q * Q
        bounds = torch.arange(nT + 1, device=device) * Q
        self.sloc = (S[:, pos + 1] - S[:, start]).to(f32).contiguous()  # Σ over the tile, through p
        self.tot = (S[:, bounds[1:].clamp(max=L)] - S[:, bounds[:-1]]).to(f32).contiguous()  # (nc, nT)
        self.sb = S[:, bounds.clamp(max=L)].contiguous()  # (nc, nT + 1) float64: S at tile starts
        ref = ((torch.arange(nT, device=device) + 1) * Q + K - 1).clamp(max=L)
        self.sref = S[:, ref].contiguous()  # (nc, nT) float64: the far tiles' column reference
        seg = torch.zeros(L, dtype=torch.int32, device=device) if segment is None else segment.to(torch.int32)
        self.seg = seg.contiguous()
        self.seg_ref = seg[ref - 1].contiguous()  # (nT,): the segment of each tile's last conv column
        r = torch.ones_like(weight, dtype=f32) if right is None else right.to(f32)
        self.vr = (weight.to(f32) * r).contiguous()
        self.dr = (D.to(f32)[:, None] * r).contiguous() if skip and D is not None else torch.zeros_like(r)
        self.A = A.to(f32).contiguous()
        self.B = B.to(f32).contiguous()
        self.C = C.to(f32).contiguous()
        w = torch.ones(nc, 1, device=device, dtype=f32) if taps is None else taps.to(f32)
        self.taps = w.contiguous()
        self.ones = ones = torch.ones_like(r)
        self.left = ones if left is None else left.to(f32).contiguous()
        self.pmask = ones[0] if input_mask is None else input_mask.to(f32).contiguous()
        self.N, self.NP, self.K, self.L, self.ssm = N, NP, K, L, ssm
        self.n_chan = nc
        self.U = self.V = None
        if ssm:
            self.U, self.V = self._far_factors(S, pos, start, ref)

    def _far_factors(self, S: Tensor, pos: Tensor, start: Tensor, ref: Tensor):
        """``U (nc, L, NP)`` and ``V (nc, L, NP)`` of the far tiles (see the module docstring).

        The segment condition ``seg_t = seg_m`` splits the same way: ``U`` keeps rows still in the segment
        of their tile's previous position, ``V`` columns in the segment of their tile's reference, and the
        kernel checks the two boundaries in between.
        """
        L, K, NP, A, seg = self.L, self.K, self.NP, self.A, self.seg
        before = seg[(start - 1).clamp(min=0)]  # the segment just before each row's tile
        U = self.C[None] * torch.exp(A[:, None, :] * self.sloc[..., None])  # exponent ≤ 0
        U = U * (seg == before).to(U.dtype)[None, :, None]
        S_ref = S[:, ref][:, pos // TILE]  # (nc, L): S_ref of each column's tile, float64
        seg_ref = self.seg_ref[pos // TILE]
        V = torch.zeros_like(U)
        for k in range(K):  # the conv width (about 4), not the sequence length
            m = pos + k
            mc = m.clamp(max=L - 1)
            inside = (m < L) & (seg[mc] == seg_ref)
            gap = (S_ref - S[:, mc + 1]).clamp_min(0).to(torch.float32)  # (nc, L)
            weight = self.taps[:, K - 1 - k, None] * self.vr[:, mc] * inside  # (nc, L)
            V += torch.exp(A[:, None, :] * gap[..., None]) * (weight[..., None] * self.B[mc][None])
        pad = NP - A.shape[1]
        if pad:
            U, V = torch.nn.functional.pad(U, (0, pad)), torch.nn.functional.pad(V, (0, pad))
        return U.contiguous(), V.contiguous()

    def _launch(self, out: Tensor, span: tuple[int, int, int, int], groups: int, per_group: int,
                row_weight: Tensor | None = None, col_weight: Tensor | None = None, transform: str = "signed",
                ) -> None:  # fmt: skip
        r0, r1, c0, c1 = span
        I0, J0 = r0 // TILE, c0 // TILE
        nI, nJ = (r1 - 1) // TILE - I0 + 1, (c1 - 1) // TILE - J0 + 1
        reduce = dict(REDUCE=groups > 0, TRANSFORM=TRANSFORMS[transform])
        slabs = groups or self.n_chan
        ones = self.ones  # no weights
        rw = ones if row_weight is None else row_weight.to(torch.float32).contiguous()
        cw = ones if col_weight is None else col_weight.to(torch.float32).contiguous()
        head = (out, out.stride(0), out.stride(1), r0, r1, c0, c1)
        U = self.sloc if self.U is None else self.U  # unread without the recurrence
        V = self.sloc if self.V is None else self.V
        _far_kernel[(nI, nJ, slabs)](
            *head, I0, J0, self.L, int(self.ssm), self.n_chan, per_group,
            self.sb, self.sref, self.A, U, V, self.left, self.pmask, self.seg, self.seg_ref, rw, cw,
            N=self.N, NP=self.NP, Q=TILE, FAR_DOT=self.far_dot, num_warps=TUNING["far_warps"], **reduce,
        )  # fmt: skip
        # near tiles: row tiles I0 … with column tiles I and I − 1 (those outside the read are masked)
        _near_kernel[(nI, 2, slabs)](
            *head, I0, self.L, int(self.ssm), self.n_chan, per_group,
            self.sloc, self.tot, self.A, self.B, self.C, self.vr, self.dr, self.seg, self.taps, self.left,
            self.pmask, rw, cw, N=self.N, K=self.K, Q=TILE, H=HALO, NEAR_DOT=TUNING["NEAR_DOT"],
            SCALAR=self.scalar, num_warps=TUNING["near_warps"], **reduce,
        )  # fmt: skip

    def dense(self, r0: int, r1: int, c0: int, c1: int, out: Tensor | None = None) -> Tensor:
        """Entries ``[:, r0:r1, c0:c1]`` of every prepared channel: ``(nc, r1 − r0, c1 − c0)``."""
        if out is None:
            out = torch.empty(self.n_chan, r1 - r0, c1 - c0, device=self.sloc.device, dtype=torch.float32)
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
        nI, nJ = (r1 - 1) // TILE - r0 // TILE + 1, (c1 - 1) // TILE - c0 // TILE + 1
        # enough programs to fill the GPU: channel groups when there are few tiles, summed afterwards
        groups = max(1, min(self.n_chan, math.ceil(2048 / (nI * nJ))))
        per_group = math.ceil(self.n_chan / groups)
        groups = math.ceil(self.n_chan / per_group)
        out = torch.empty(groups, r1 - r0, c1 - c0, device=self.sloc.device, dtype=torch.float32)
        self._launch(out, (r0, r1, c0, c1), groups, per_group, row_weight, col_weight, transform)
        return out.sum(0) if groups > 1 else out[0]
