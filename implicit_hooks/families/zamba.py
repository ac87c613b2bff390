"""Zamba's multi-head Mamba-1 block (``ZambaMambaMixer``): S6 per head, with per-head parameters.

Channels are the ``C = H·P`` inner channels, ``c = h·P + p``. Per channel (``docs/maths.md``)::

    y = G · (R + diag(D)) · Z · M · P · x + bias
    R[t, j] = Σ_n C_t,h[n] · exp(A[c, n] · Σ_{k=j+1..t} Δ_k,c) · Δ_j,c · B_j,h[n]

As in Mamba-1, but ``x`` and ``z`` are interleaved in the ``in_proj`` output (``x_c`` at ``2c``, ``z_c``
at ``2c + 1``), and ``B``, ``C`` and the low-rank ``Δ`` come from per-head projections (bare
Parameters ``x_proj_weight (H, R + 2N, P)``, ``dt_proj_weight (H, P, R)``), so they differ per head.
Like Mamba-1, a multi-token call starts its scan from zero even when a cache holds a state; only a
single-token step reads it. Only ``in_proj`` and ``out_proj`` are tapped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patcher import Patcher, require
from ..recording import BlockRecord
from ..view import Core, Factors
from ._hf import activation_slope, cache_states, keep_conv_context
from .mamba import selective_matvec
from .mamba2 import cache_of, causal_conv, padding_mask, segsum


class MultiHeadSelectiveCore(Core):
    """``R + diag(D)`` of a multi-head S6 call: per-channel decays, per-head ``B`` and ``C``.

    Shapes: ``delta (B, C, L)``, ``A (C, N)``, ``B``/``C (B, H, L, N)``, ``D (C,)``, ``head_of (C,)``.
    """

    work_per_entry = 6
    has_skip = True

    def __init__(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, head_of: Tensor):
        self.delta, self.A, self.B, self.C, self.D, self.head_of = delta, A, B, C, D, head_of
        self.has_skip = D is not None
        self.cumdelta = segsum(delta)

    #: positions per chunk of :meth:`matvec`
    chunk = 64

    def matvec(self, b: int, v: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        """``(R + diag(D)) @ v`` for every channel, ``v (C, L)``: Mamba's chunked recurrence
        (:func:`~implicit_hooks.families.mamba.selective_matvec`) with the ``B``/``C`` of each channel's
        head."""
        v = v.to(self.delta.dtype)
        out = torch.zeros_like(v)
        if ssm:
            B, C = (x[b].index_select(0, self.head_of) for x in (self.B, self.C))  # (C, L, N) each
            out = selective_matvec(self.delta[b], self.A, B, C, v, self.chunk)
        if skip and self.D is not None:
            out = out + self.D.to(v.dtype)[:, None] * v
        return out

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        dtype = self.delta.dtype
        out = torch.zeros(len(chans), len(rows), len(cols), dtype=dtype, device=self.delta.device)
        if ssm:
            S = self.cumdelta[b].index_select(0, chans)  # (nc, L)
            gap = S.index_select(1, rows)[:, :, None] - S.index_select(1, cols)[:, None, :]
            gap = gap.clamp_min(0).to(dtype)  # (nc, nr, ncol); j > t is masked below
            A = self.A.index_select(0, chans).to(dtype)  # (nc, N)
            head = self.head_of.index_select(0, chans)
            C_rows = self.C[b].index_select(0, head).index_select(1, rows).to(dtype)  # (nc, nr, N)
            B_cols = self.B[b].index_select(0, head).index_select(1, cols).to(dtype)  # (nc, ncol, N)
            for n in range(A.shape[1]):  # the state size, not the sequence length
                out = out + torch.exp(gap * A[:, n, None, None]) * (
                    C_rows[:, :, n, None] * B_cols[:, None, :, n]
                )
            causal = (rows[:, None] >= cols[None, :]).to(dtype)
            out = out * (self.delta[b].index_select(0, chans).index_select(1, cols)[:, None, :] * causal)
        if skip and self.D is not None:
            eye = (rows[:, None] == cols[None, :]).to(dtype)
            out = out + self.D.index_select(0, chans).to(dtype)[:, None, None] * eye
        return out


class ZambaMambaPatcher(Patcher):
    """transformers' ``ZambaMambaMixer`` (multi-head Mamba-1; keyword calls)."""

    kind = "mamba"
    holds_blocks = False
    real_output_key = "out_proj_input"

    tap_paths = {"in_proj": ("in_proj", "output"), "out_proj_input": ("out_proj", "input")}

    weight_paths = {
        "conv.weight": "conv1d.weight",
        "conv.bias": "conv1d.bias",
        **{k: k for k in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D")},
    }

    def on_call(self, record: BlockRecord, args: tuple, kwargs: dict) -> None:
        hidden = self.argument("hidden_states", args, kwargs)
        record.raw["attention_mask"] = self.argument("attention_mask", args, kwargs)
        conv_state, recurrent_state = cache_states(cache_of(self, args, kwargs), self.module.layer_idx)
        # The forward updates the cache in place: keep copies of what this call starts from.
        keep_conv_context(record, conv_state, self.module)
        # The scan reads the recurrent state only on single-token steps (longer calls start from zero).
        if recurrent_state is not None and hidden is not None and hidden.shape[1] == 1:
            record.raw["initial_state"] = recurrent_state.clone()  # (B, H, P, N)

    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Every per-call quantity in ``dtype``; shapes in the module docstring (cached per dtype)."""
        if dtype in record.cache:
            return record.cache[dtype]
        m, w = self.module, record.weights
        require("in_proj" in record.raw, f"{record.name}: in_proj never ran as a module during this call")
        proj = record.raw["in_proj"].to(dtype)
        batch, L, _ = proj.shape
        C, H, P = m.intermediate_size, m.n_mamba_heads, m.mamba_head_dim
        R, N = m.time_step_rank, m.ssm_state_size
        xz = proj.transpose(1, 2).reshape(batch, C, 2, L)  # x and z interleaved per channel
        x, z = xz[:, :, 0], xz[:, :, 1]
        mask = padding_mask(record, batch, L, dtype)

        taps = w["conv.weight"].squeeze(1).to(dtype)  # (C, K)
        K = taps.shape[1]
        conv_bias = w["conv.bias"].to(dtype) if "conv.bias" in w else None
        context = record.raw.get("conv_context")
        context = context.to(dtype) if context is not None else x.new_zeros(batch, C, K - 1)
        u = causal_conv(x, taps, conv_bias, context)  # (B, C, L)
        slope = activation_slope(m.activation, u)
        xc = u * slope if mask is None else u * slope * mask[:, None, :]

        x_dbl = torch.einsum("hrp,bhpl->bhlr", w["x_proj_weight"].to(dtype), xc.reshape(batch, H, P, L))
        dt_low, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)  # (B, H, L, ·)
        dt = torch.einsum("hpr,bhlr->bhpl", w["dt_proj_weight"].to(dtype), dt_low)
        if "dt_proj_bias" in w:
            dt = dt + w["dt_proj_bias"].to(dtype)[None, :, :, None]
        delta = F.softplus(dt).reshape(batch, C, L)
        A = -torch.exp(w["A_log"].to(dtype)).reshape(C, N)
        D = w["D"].to(dtype).reshape(C)
        head_of = torch.arange(C, device=proj.device) // P

        padded_x = torch.zeros_like(x) if mask is None else x * (1 - mask[:, None, :])
        conv_offset = causal_conv(padded_x, taps, conv_bias, context)

        state_offset = None
        h0 = record.raw.get("initial_state")
        if h0 is not None:  # y_t += C_t,h · exp(A · Σ_{k≤t} Δ_k) · h0
            decay = torch.exp(A[None, :, None, :] * segsum(delta).to(dtype)[..., None])  # (B, C, L, N)
            C_c = Cm.index_select(1, head_of)  # (B, C, L, N)
            state_offset = torch.einsum("bcln,bcln,bcn->bcl", decay, C_c, h0.to(dtype).reshape(batch, C, N))

        derived = dict(
            values=x,
            z=z,
            gate=F.silu(z),
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
            head_of=head_of,
        )
        record.cache[dtype] = derived
        return derived

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        return Factors(
            values=d["values"],
            core=MultiHeadSelectiveCore(d["delta"], d["A"], d["B"], d["C"], d["D"], d["head_of"]),
            left={"gate": d["gate"]},
            right={"act": d["act"]},
            conv=d["conv"],
            conv_offset=d["conv_offset"],
            state_offset=d["state_offset"],
            input_mask=d["mask"],
            mid_mask=d["mask"],
            groups={"heads": d["head_of"]},
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype):
        def get(key: str):
            return lambda: self.derive(record, dtype)[key]

        def decay() -> Tensor:
            d = self.derive(record, dtype)
            return torch.exp(d["delta"][..., None] * d["A"][None, :, None, :])  # (B, C, L, N)

        def input_proj() -> Tensor:
            d = self.derive(record, dtype)
            return d["delta"][..., None] * d["B"].index_select(1, d["head_of"])  # (B, C, L, N)

        keys = ("values", "gate", "conv_preact", "act", "mask", "delta", "A", "B", "C")
        thunks = {k: get(k) for k in keys}
        thunks.update(
            decay=decay, input_proj=input_proj, skip=get("D"), readout=get("C"), heads=get("head_of")
        )
        return thunks
