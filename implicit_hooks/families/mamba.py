"""Mamba-1 (S6) blocks of transformers: ``MambaMixer``, ``FalconMambaMixer``, ``JambaMambaMixer``.

Per channel ``c`` (``docs/maths.md``)::

    y = G · (R + diag(D)) · Z · M · P · x + bias
    R[t, j] = Σ_n C_t[n] · exp(A[c, n] · Σ_{k=j+1..t} Δ_k) · Δ_j · B_j[n]

``x``/``z`` are the halves of the ``in_proj`` output, ``M`` the depthwise conv, ``Z = σ(u)`` the SiLU
slope at the conv output ``u`` (times the padding mask), ``G = SiLU(z)``. Only ``in_proj`` (and, off the
fused training path, ``out_proj``) are tapped: everything else is derived from the weights when a view
is read, so recording costs two references per call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patcher import Patcher, require
from ..recording import BlockRecord
from ..view import Core, Factors, take
from ._hf import activation_slope, cache_states, keep_conv_context


class SelectiveCore(Core):
    """``R + diag(D)`` of a Mamba-1 call, for one or many channels, any block of rows and columns.

    Shapes: ``delta (B, C, L)``, ``A (C, N)``, ``B``/``C (B, L, N)``, ``D (C,)``.

    Two assemblies of the same entries: :meth:`direct` (one exponential per entry and state, the
    readable twin) and :meth:`chunked` (the default for contiguous columns): positions are cut into
    chunks of ``chunk`` and a pair ``(t, j)`` in different chunks factorises through the chunk
    boundaries, ``exp(A·(S_t − S_j)) = exp(A·(S_t − S_{I})) · exp(A·(S_{I} − S_{J})) · exp(A·(S_{J} − S_j))``,
    every factor ≤ 1, so far pairs are one matrix product over the state per chunk pair and only pairs
    inside a chunk need their own exponentials.
    """

    work_per_entry = 6
    has_skip = True
    # a last-token row of 1536 channels on the H200: 0.9–1.3 / 2.6–3.7 / 18 ms by the kernel against
    # 4.5–4.7 / 9.3–10 / 31 ms by the torch path at L = 512 / 2048 / 16384, at the same peak memory
    # (benchmarks/results/gpu.md, runs Q and R)
    fused_rows = True

    def __init__(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, chunk: int = 64):
        # contiguous once here, not copied by every fused read (the recorded taps come as transposed views)
        self.delta, self.A, self.D = delta.contiguous(), A, D
        self.B, self.C = B.contiguous(), C.contiguous()
        self.has_skip = D is not None
        self.chunk = chunk
        # Segment sums Σ_{k=j+1..t} Δ_k as differences of one cumulative sum, kept in float64 so that
        # the difference of two large sums stays exact to float32 precision at any length.
        # S[p + 1] = Σ_{k ≤ p} Δ_k and S[0] = 0, so that chunk boundaries index it directly.
        self.cumdelta = F.pad(delta.double().cumsum(-1), (1, 0))

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        if ssm and len(cols) > 1 and bool((cols[1:] - cols[:-1] == 1).all()):
            return self.block_range(b, chans, rows, int(cols[0]), int(cols[-1]) + 1, ssm=ssm, skip=skip)
        dtype = self.delta.dtype
        if ssm:
            out = self.direct(b, chans, rows, cols)
        else:
            out = torch.zeros(len(chans), len(rows), len(cols), dtype=dtype, device=self.delta.device)
        return self._with_skip(out, chans, rows, cols, skip)

    def block_range(
        self, b: int, chans: Tensor, rows: Tensor, c0: int, c1: int, *, ssm: bool, skip: bool
    ) -> Tensor:
        """:meth:`block` of the columns ``c0 … c1 − 1``: the chunked products (:meth:`chunked`)."""
        cols = torch.arange(c0, c1, device=rows.device)
        if not ssm or c1 - c0 == 1:
            return self.block(b, chans, rows, cols, ssm=ssm, skip=skip)
        return self._with_skip(self.chunked(b, chans, rows, c0, c1), chans, rows, cols, skip)

    def _with_skip(self, out: Tensor, chans: Tensor, rows: Tensor, cols: Tensor, skip: bool) -> Tensor:
        if skip and self.D is not None:
            eye = (rows[:, None] == cols[None, :]).to(out.dtype)
            out = out + self.D.index_select(0, chans).to(out.dtype)[:, None, None] * eye
        return out

    def tiles(self, b: int, chans: Tensor | slice, **parts: Any) -> Any:
        """The fused Triton assembler of whole tiles (:mod:`implicit_hooks.kernels`)."""
        from ..kernels import DiagonalTiles

        S, B, C, delta = self.rows_of(b, "cumdelta", "B", "C", "delta")
        return DiagonalTiles(
            take(S, chans),
            take(self.A, chans),
            B,
            C,
            take(delta, chans),
            None if self.D is None else take(self.D, chans),
            **parts,
        )

    def matvec(self, b: int, v: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        """``(R + diag(D)) @ v`` for every channel, ``v (C, L)`` (:func:`selective_matvec`)."""
        v = v.to(self.delta.dtype)
        out = torch.zeros_like(v)
        if ssm:
            out = selective_matvec(self.delta[b], self.A, self.B[b], self.C[b], v, self.chunk)
        if skip and self.D is not None:
            out = out + self.D.to(v.dtype)[:, None] * v
        return out

    def _gap(self, S: Tensor, to: Tensor, since: Tensor) -> Tensor:
        """``S[to] − S[since]`` (S padded: index p + 1 is the sum through position p), clamped at 0."""
        return (
            (
                S.index_select(1, to.flatten()).view(len(S), *to.shape)
                - S.index_select(1, since.flatten()).view(len(S), *since.shape)
            )
            .clamp_min(0)
            .to(self.delta.dtype)
        )

    def direct(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """``R[chans, rows, cols]``, one exponential per entry and state: ``(nc, nr, ncol)``."""
        dtype = self.delta.dtype
        S = self.cumdelta[b].index_select(0, chans)  # (nc, L + 1)
        gap = self._gap(S, rows[:, None] + 1, cols[None, :] + 1)  # (nc, nr, ncol); j > t masked below
        A = self.A.index_select(0, chans).to(dtype)  # (nc, N)
        C_rows = self.C[b].index_select(0, rows).to(dtype)  # (nr, N)
        B_cols = self.B[b].index_select(0, cols).to(dtype)  # (ncol, N)
        out = torch.zeros_like(gap)
        for n in range(A.shape[1]):  # the state size (16), not the sequence length
            out = out + torch.exp(gap * A[:, n, None, None]) * (C_rows[:, n, None] * B_cols[None, :, n])
        causal = (rows[:, None] >= cols[None, :]).to(dtype)
        return out * (self.delta[b].index_select(0, chans).index_select(1, cols)[:, None, :] * causal)

    def chunked(self, b: int, chans: Tensor, rows: Tensor, c0: int, c1: int) -> Tensor:
        """``R[chans, rows, c0:c1]`` through chunk boundaries: ``(nc, nr, c1 - c0)``."""
        dtype, device, Q = self.delta.dtype, self.delta.device, self.chunk
        L = self.delta.shape[-1]
        S = self.cumdelta[b].index_select(0, chans)  # (nc, L + 1)
        A = self.A.index_select(0, chans).to(dtype)[:, None, :]  # (nc, 1, N)
        J0, J1 = c0 // Q, (c1 - 1) // Q + 1  # the column chunks, padded to whole chunks
        nJ = J1 - J0
        pos = torch.arange(J0 * Q, J1 * Q, device=device)  # (nJ·Q,) padded column positions
        inside = ((pos >= c0) & (pos < c1)).to(dtype)
        pos_c = pos.clamp(max=L - 1)
        row_chunk = torch.div(rows, Q, rounding_mode="floor")  # I(t)
        # V[j] = Δ_j B_j exp(A (S_{end of j's chunk} − S_j)): the key side, carried to its chunk's end
        ends = (torch.div(pos_c, Q, rounding_mode="floor") + 1).mul(Q).clamp(max=L)
        V = torch.exp(self._gap(S, ends, pos_c + 1)[..., None] * A)  # (nc, nJ·Q, N)
        V = (
            V
            * self.B[b].index_select(0, pos_c).to(dtype)
            * (self.delta[b].index_select(0, chans).index_select(1, pos_c) * inside)[..., None]
        )
        # U[t] = C_t exp(A (S_t − S_{start of t's chunk})): the query side, from its chunk's start
        U = torch.exp(self._gap(S, rows + 1, row_chunk * Q)[..., None] * A)  # (nc, nr, N)
        U = U * self.C[b].index_select(0, rows).to(dtype)
        # Between chunks: exp(A (S_{start of I} − S_{end of J})) for J < I
        col_chunks = torch.arange(J0, J1, device=device)
        mid_gap = self._gap(S, (row_chunk * Q)[:, None], ((col_chunks + 1) * Q).clamp(max=L)[None, :])
        far = (col_chunks[None, :] < row_chunk[:, None]).to(dtype)  # (nr, nJ)
        W = U[:, :, None, :] * torch.exp(mid_gap[..., None] * A[:, :, None, :]) * far[None, :, :, None]
        out = torch.einsum("ctjn,cjqn->ctjq", W, V.view(len(chans), nJ, Q, -1))  # (nc, nr, nJ, Q)
        # Inside a chunk: direct exponentials over the row's own chunk (Q columns per row)
        band = row_chunk[:, None] * Q + torch.arange(Q, device=device)[None, :]  # (nr, Q)
        band_c = band.clamp(max=L - 1)
        gap = self._gap(S, (rows + 1)[:, None].expand_as(band), band_c + 1)  # (nc, nr, Q)
        C_rows = self.C[b].index_select(0, rows).to(dtype)  # (nr, N)
        B_band = self.B[b].index_select(0, band_c.flatten()).view(*band.shape, -1).to(dtype)  # (nr, Q, N)
        near = torch.zeros_like(gap)
        for n in range(A.shape[-1]):  # the state size (16), not the sequence length
            near = near + torch.exp(gap * A[:, :, n, None]) * (C_rows[:, n, None] * B_band[..., n])
        keep = ((band <= rows[:, None]) & (band >= c0) & (band < c1)).to(dtype)
        delta_band = (
            self.delta[b]
            .index_select(0, chans)
            .index_select(1, band_c.flatten())
            .view(len(chans), *band.shape)
        )
        near = near * delta_band * keep
        slot = row_chunk - J0  # the padded chunk that holds row t's own chunk (rows outside add nothing)
        ok = ((slot >= 0) & (slot < nJ)).to(dtype)
        out[:, torch.arange(len(rows), device=device), slot.clamp(0, nJ - 1)] += near * ok[None, :, None]
        return out.reshape(len(chans), len(rows), nJ * Q)[:, :, c0 - J0 * Q : c1 - J0 * Q]


class MambaPatcher(Patcher):
    """transformers' ``MambaMixer`` (and the base of the FalconMamba and Jamba variants)."""

    kind = "mamba"
    holds_blocks = False
    real_output_key = "out_proj_input"
    #: how B, C and the low-rank Δ are normalised after ``x_proj``: None, "weightless" or "weighted".
    bcdt_norm: str | None = None

    tap_paths = {"in_proj": ("in_proj", "output"), "out_proj_input": ("out_proj", "input")}

    weight_paths = {
        "conv.weight": "conv1d.weight",
        "conv.bias": "conv1d.bias",
        **{k: k for k in ("x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D")},
    }

    def on_call(self, record: BlockRecord, args: tuple, kwargs: dict) -> None:
        hidden = self.argument("hidden_states", args, kwargs)
        record.raw["attention_mask"] = self.argument("attention_mask", args, kwargs)
        cache = self.argument("cache", args, kwargs) or self.argument("cache_params", args, kwargs)
        conv_state, recurrent_state = cache_states(cache, self.module.layer_idx)
        # The forward updates the cache in place: keep copies of what this call starts from.
        keep_conv_context(record, conv_state, self.module)
        # Mamba-1 reads the recurrent state only on single-token steps (longer calls start from zero).
        if recurrent_state is not None and hidden is not None and hidden.shape[1] == 1:
            record.raw["initial_state"] = recurrent_state.clone()

    # --- derivation -----------------------------------------------------------------------------
    def _norm(self, t: Tensor, part: str, record: BlockRecord) -> Tensor:
        if self.bcdt_norm is None:
            return t
        module = getattr(self.module, f"{part}_layernorm")
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        normed = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
        if self.bcdt_norm == "weighted":
            normed = record.weights[f"{part}_layernorm.weight"].to(t.dtype) * normed
        return normed

    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Every per-call quantity in ``dtype``; shapes in the module docstring (cached per dtype)."""
        if dtype in record.cache:
            return record.cache[dtype]
        m, w = self.module, record.weights
        require("in_proj" in record.raw, f"{record.name}: in_proj never ran as a module during this call")
        xz = record.raw["in_proj"]
        batch, L, _ = xz.shape
        C = m.intermediate_size
        x = xz[..., :C].transpose(1, 2).to(dtype)  # (B, C, L)
        z = xz[..., C:].transpose(1, 2).to(dtype)

        mask = record.raw.get("attention_mask")
        if mask is not None:
            require(
                mask.dim() == 2 and tuple(mask.shape) == (batch, L),
                f"{record.name}: attention_mask of shape {tuple(mask.shape)} does not match the call's "
                f"(batch, length) = {(batch, L)}",
            )
            mask = mask.to(dtype)

        taps = w["conv.weight"].squeeze(1).to(dtype)  # (C, K)
        K = taps.shape[1]
        conv_bias = w["conv.bias"].to(dtype) if "conv.bias" in w else None
        context = record.raw.get("conv_context")
        context = context.to(dtype) if context is not None else x.new_zeros(batch, C, K - 1)

        def conv(signal: Tensor, left: Tensor, bias: Tensor | None) -> Tensor:
            return F.conv1d(torch.cat([left, signal], dim=-1), taps[:, None, :], bias, groups=C)

        u = conv(x, context, conv_bias)  # (B, C, L): the conv output before the activation
        slope = activation_slope(m.activation, u)  # Z = act(u) / u
        xc = u * slope if mask is None else u * slope * mask[:, None, :]  # the SSM input: act(u) · mask

        x_dbl = F.linear(xc.transpose(1, 2), w["x_proj.weight"].to(dtype))  # (B, L, R + 2N)
        R, N = m.time_step_rank, m.ssm_state_size
        dt_low, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
        dt_low, Bm, Cm = (
            self._norm(dt_low, "dt", record),
            self._norm(Bm, "b", record),
            self._norm(Cm, "c", record),
        )
        dt = w["dt_proj.weight"].to(dtype) @ dt_low.transpose(1, 2)  # (B, C, L)
        delta = F.softplus(dt + w["dt_proj.bias"].to(dtype)[None, :, None])
        A = -torch.exp(w["A_log"].to(dtype))  # (C, N)
        D = w["D"].to(dtype)

        # What the conv adds that is not conv(P·x): its bias, a cached left context, padded inputs.
        padded_x = torch.zeros_like(x) if mask is None else x * (1 - mask[:, None, :])
        conv_offset = conv(padded_x, context, conv_bias)

        state_offset = None
        h0 = record.raw.get("initial_state")
        if h0 is not None:  # y_t += C_t · exp(A · Σ_{k≤t} Δ_k) · h0
            decay = torch.exp(A[None, :, None, :] * delta.cumsum(-1)[..., None])  # (B, C, L, N)
            state_offset = torch.einsum("bcln,bln,bcn->bcl", decay, Cm, h0.to(dtype))

        derived = dict(
            values=x,
            z=z,
            gate=F.silu(z).contiguous(),  # row-major once: Factors then keep this tensor, not a copy
            conv_preact=u,
            act=slope,
            mask=mask,
            delta=delta,
            A=A,
            B=Bm,
            C=Cm,
            D=D,
            conv=taps,
            conv_offset=conv_offset,
            state_offset=state_offset,
        )
        record.cache[dtype] = derived
        return derived

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        return Factors(
            values=d["values"],
            core=SelectiveCore(d["delta"], d["A"], d["B"], d["C"], d["D"]),
            left={"gate": d["gate"]},
            right={"act": d["act"]},
            conv=d["conv"],
            conv_offset=d["conv_offset"],
            state_offset=d["state_offset"],
            input_mask=d["mask"],
            mid_mask=d["mask"],
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype):
        def get(key: str):
            return lambda: self.derive(record, dtype)[key]

        def decay() -> Tensor:
            d = self.derive(record, dtype)
            return torch.exp(d["delta"][..., None] * d["A"][None, :, None, :])  # (B, C, L, N)

        def input_proj() -> Tensor:
            d = self.derive(record, dtype)
            return d["delta"][..., None] * d["B"][:, None, :, :]  # (B, C, L, N)

        thunks = {k: get(k) for k in ("values", "gate", "conv_preact", "act", "mask", "delta", "A", "B", "C")}
        thunks.update(decay=decay, input_proj=input_proj, skip=get("D"), readout=get("C"))
        return thunks


class FalconMambaPatcher(MambaPatcher):
    """``FalconMambaMixer``: B, C and the low-rank Δ pass a weightless RMS norm after ``x_proj``."""

    kind = "mamba"
    bcdt_norm = "weightless"


class JambaMambaPatcher(MambaPatcher):
    """``JambaMambaMixer``: B, C and the low-rank Δ pass learned RMS norms; called with keywords."""

    kind = "mamba"
    bcdt_norm = "weighted"
    weight_paths = {
        **MambaPatcher.weight_paths,
        **{f"{part}_layernorm.weight": f"{part}_layernorm.weight" for part in ("dt", "b", "c")},
    }


def selective_matvec(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, v: Tensor, chunk: int = 64) -> Tensor:
    """``R @ v`` of an S6 core for every channel, the recurrence run chunk by chunk: ``(C, L)``.

    ``delta``, ``v (C, L)``, ``A (C, N)``; ``B``/``C``: ``(L, N)`` shared by the channels (Mamba) or
    ``(C, L, N)`` per channel (Zamba's heads). Inside a chunk the entries of ``R`` (``C × N × Q × Q``
    exponentials); across chunks the state ``h (C, N)`` carried from one chunk end to the next. Loops over
    chunks, never over positions.
    """
    dtype = v.dtype
    A = A.to(dtype)
    B, C = B.to(dtype), C.to(dtype)
    own = "c" if B.dim() == 3 else ""  # B and C per channel, or shared
    state = v.new_zeros(A.shape)  # h after the previous chunk: (C, N)
    out = []
    for s in range(0, v.shape[1], chunk):  # chunks of the sequence, not positions
        e = min(s + chunk, v.shape[1])
        Bs, Cs = B[..., s:e, :], C[..., s:e, :]
        loc = delta[:, s:e].double().cumsum(-1)  # Σ_{k=s..t} Δ_k: (C, q)
        gap = (loc[:, :, None] - loc[:, None, :]).clamp_min(0).to(dtype)  # (C, q, q)
        causal = torch.ones(e - s, e - s, dtype=dtype, device=v.device).tril()
        decay = torch.exp(A[:, :, None, None] * gap[:, None])  # (C, N, q, q)
        R = torch.einsum(f"cntj,{own}tn,{own}jn->ctj", decay, Cs, Bs) * causal * delta[:, None, s:e]
        to_t = torch.exp(A[:, :, None] * loc.to(dtype)[:, None, :])  # exp(A Σ_{k=s..t} Δ_k): (C, N, q)
        y = torch.einsum("ctj,cj->ct", R, v[:, s:e]) + torch.einsum(f"{own}tn,cnt,cn->ct", Cs, to_t, state)
        to_end = torch.exp(A[:, :, None] * (loc[:, -1:] - loc).to(dtype)[:, None, :])  # (C, N, q)
        state = to_t[:, :, -1] * state + torch.einsum(
            f"cnj,{own}jn,cj->cn", to_end, Bs, delta[:, s:e] * v[:, s:e]
        )
        out.append(y)
    return torch.cat(out, dim=-1)
