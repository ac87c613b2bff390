"""RG-LRU blocks (Griffin, Hawk) of transformers' RecurrentGemma: ``RecurrentGemmaRecurrentBlock``.

Per channel ``c`` (``docs/maths.md``)::

    y = G · R · M · x + bias
    R[t, j] = exp(S_t − S_j) · [no reset in (j, t]] · i_j · m_j        (j ≤ t),   S = cumsum(log a)
    log a_t = −8 · r_t · softplus(Λ),   m_t = sqrt(1 − a_t²)   (a_t = 0, m_t = 1 where position_ids == 0)

``x`` is the ``linear_x`` output before the conv, ``M`` the depthwise conv (its bias, and the cached left
context of a decode step, go to ``bias``), ``u = M·x + conv bias`` the RG-LRU input,
``i_t = σ(W_x u_t + b_x)`` and ``r_t = σ(W_a u_t + b_a)`` its input and recurrence gates (block-diagonal per
head), ``G = GeLU(linear_y(h))`` the output gate (the model's own ``act_fn``). There is no activation after
the conv (``Z = I``). A recurrent state ``h_0`` carried in from a previous call adds
``exp(S_t) · [no reset in [0, t]] · h_0`` to ``bias``.

Only ``linear_x``, ``linear_y`` and ``linear_out`` are tapped; the pre-hook copies the module-attribute
states (``conv1d_state``, ``rg_lru.recurrent_states``) the call starts from. Everything else is derived
from the weights when a view is read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patcher import Patcher, require
from ..recording import BlockRecord
from ..view import Core, Factors, count, take


class RGLRUCore(Core):
    """``R`` of an RG-LRU call, for any channels, rows and columns.

    Shapes: ``log_decay (B, C, L)`` (``log a``, set to 0 at resets), ``segment (B, L)`` (number of resets at
    or before each position), ``input_scale (B, C, L)`` (``i · m``, what multiplies ``u_j`` into the state).
    """

    work_per_entry = 6
    has_skip = False
    fused_work = 16  # one state

    def __init__(self, log_decay: Tensor, segment: Tensor, input_scale: Tensor):
        self.segment = segment
        self.input_scale = input_scale.contiguous()  # once here, not copied by every fused read
        # Segment sums Σ_{k=j+1..t} −log a_k as differences of one cumulative sum, in float64 so that the
        # difference of two large sums keeps float32 precision at any length; kept as the fused kernels
        # read it (rate[..., p + 1] = Σ_{k ≤ p} −log a_k, rate[..., 0] = 0), not rebuilt by every read.
        self.rate = F.pad(log_decay.double().cumsum(-1).neg_(), (1, 0))

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        dtype = self.input_scale.dtype
        if not ssm:
            return torch.zeros(len(chans), len(rows), len(cols), dtype=dtype, device=self.input_scale.device)
        R = self.rate[b].index_select(0, chans)  # (nc, L + 1)
        segsum = R.index_select(1, cols + 1)[:, None, :] - R.index_select(1, rows + 1)[:, :, None]
        seg = self.segment[b]
        # causal, and no reset strictly after j and at or before t (a reset at j itself is harmless)
        linked = (rows[:, None] >= cols[None, :]) & (
            seg.index_select(0, rows)[:, None] == seg.index_select(0, cols)
        )
        decay = torch.exp(segsum.masked_fill(~linked, float("-inf"))).to(dtype)
        scale = self.input_scale[b].index_select(0, chans).index_select(1, cols)  # (nc, ncol)
        return decay * scale[:, None, :]

    #: positions per chunk of :meth:`matvec`
    chunk = 64

    def matvec(self, b: int, v: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        """``R @ v`` for every channel, ``v (C, L)``, chunk by chunk (``O(L · chunk)``): inside a chunk the
        entries of ``R``; across chunks the state, which with one state per channel is the output at the
        previous chunk's last position, carried to the rows still in its segment. Loops over chunks, never
        over positions."""
        dtype = self.input_scale.dtype
        if not ssm:
            return torch.zeros_like(v, dtype=dtype)
        S, seg = -self.rate[b, :, 1:], self.segment[b]  # (C, L) float64: Σ log a, (L,)
        u = self.input_scale[b] * v.to(dtype)
        L = v.shape[1]
        out = []
        for s in range(0, L, self.chunk):  # chunks of the sequence, not positions
            e = min(s + self.chunk, L)
            S_c, seg_c = S[:, s:e], seg[s:e]
            linked = torch.ones(e - s, e - s, dtype=torch.bool, device=v.device).tril()
            linked &= seg_c[:, None] == seg_c[None, :]
            gap = (S_c[:, :, None] - S_c[:, None, :]).to(dtype)  # float64 differences of long sums
            R = torch.exp(gap.clamp_max_(0)) * linked  # exponents ≤ 0 where linked (t ≥ j)
            y = torch.einsum("ctj,cj->ct", R, u[:, s:e])
            if s:
                carried = torch.exp((S_c - S[:, s - 1 : s]).to(dtype)) * (seg_c == seg[s - 1]).to(dtype)
                y = y + carried * out[-1][:, -1:]
            out.append(y)
        return torch.cat(out, dim=-1)

    def tiles(self, b: int, chans: Tensor | slice, **parts: Any) -> Any:
        """The fused Triton assembler (:mod:`implicit_hooks.kernels`): one state per channel, rate
        ``−log a`` (``A = −1``), input weight ``i · m``, entries across a reset zero."""
        from ..kernels import DiagonalTiles, filled

        rate, scale, segment = self.rows_of(b, "rate", "input_scale", "segment")
        S = take(rate, chans)  # (nc, L + 1)
        L, device = S.shape[1] - 1, S.device
        ones, A = filled(L, 1.0, device, column=True), filled(count(chans), -1.0, device, column=True)
        return DiagonalTiles(S, A, ones, ones, take(scale, chans), None, segment, **parts)


#: the RG-LRU's own parameters (``block.rg_lru.<name>``)
_LRU_WEIGHTS = ("recurrent_param", "input_gate_weight", "input_gate_bias", "recurrent_gate_weight",
                "recurrent_gate_bias")  # fmt: skip


class RGLRUPatcher(Patcher):
    """transformers' ``RecurrentGemmaRecurrentBlock`` with its ``RecurrentGemmaRglru``."""

    kind = "rglru"
    holds_blocks = False
    real_output_key = "linear_out_input"

    tap_paths = {
        "linear_x": ("linear_x", "output"),
        "linear_y": ("linear_y", "output"),
        "linear_out_input": ("linear_out", "input"),
    }

    weight_paths = {
        "conv.weight": "conv_1d.weight",
        "conv.bias": "conv_1d.bias",
        **{k: f"rg_lru.{k}" for k in _LRU_WEIGHTS},
    }

    def on_call(self, record: BlockRecord, args: tuple, kwargs: dict) -> None:
        m = self.module
        hidden = self.argument("input_states", args, kwargs)
        position_ids = self.argument("position_ids", args, kwargs)
        use_cache = self.argument("use_cache", args, kwargs, default=True)
        record.raw["position_ids"] = position_ids
        if hidden is None or position_ids is None or not use_cache:
            return  # use_cache=False: the block starts from zero states
        # Mirror the forward: states of another batch size (or none) are replaced by zeros.
        fresh = m.conv1d_state is None or m.conv1d_state.shape[0] != hidden.shape[0]
        if fresh:
            return

        # The forward reassigns these attributes: keep copies of what this call starts from.
        def copy(t: Tensor) -> Tensor:
            return t.clone() if record.grad else t.detach().clone()

        if m.rg_lru.recurrent_states is not None:
            record.raw["initial_state"] = copy(m.rg_lru.recurrent_states)
        if position_ids.shape[1] == 1 and m.conv1d_width > 1:  # the decode branch reads the conv state
            record.raw["conv_context"] = copy(m.conv1d_state)

    # --- derivation -----------------------------------------------------------------------------
    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Every per-call quantity in ``dtype``, channels first: ``(B, C, L)`` unless noted (cached)."""
        if dtype in record.cache:
            return record.cache[dtype]
        m, lru, w = self.module, self.module.rg_lru, record.weights
        for key in ("linear_x", "linear_y"):
            require(key in record.raw, f"{record.name}: {key} never ran as a module during this call")
        x = record.raw["linear_x"].transpose(1, 2).to(dtype)  # (B, C, L)
        batch, C, L = x.shape
        gate = m.act_fn.forward(record.raw["linear_y"].to(dtype)).transpose(1, 2)  # the model's own GeLU
        gate = gate.contiguous()  # row-major once: Factors then keep this tensor, not a copy

        position_ids = record.raw["position_ids"]
        require(
            position_ids is not None and position_ids.dim() == 2 and position_ids.shape[1] == L,
            f"{record.name}: position_ids must be (batch, {L}), got "
            f"{None if position_ids is None else tuple(position_ids.shape)}",
        )
        reset = (position_ids == 0).expand(batch, L)  # (B, L)
        segment = reset.cumsum(-1, dtype=torch.int32)  # int32, as the fused kernels read it

        taps = w["conv.weight"][:, 0, :].to(dtype)  # (C, K)
        K = taps.shape[1]
        conv_bias = w["conv.bias"].to(dtype)
        context = record.raw.get("conv_context")
        if context is not None:
            require(
                tuple(context.shape) == (batch, C, K - 1),
                f"{record.name}: the conv state has shape {tuple(context.shape)}, "
                f"expected {(batch, C, K - 1)}",
            )
            context = context.to(dtype)
        else:
            context = x.new_zeros(batch, C, K - 1)

        def conv(signal: Tensor, bias: Tensor | None) -> Tensor:
            return F.conv1d(torch.cat([context, signal], dim=-1), taps[:, None, :], bias, groups=C)

        u = conv(x, conv_bias)  # (B, C, L): the RG-LRU input
        conv_offset = conv(torch.zeros_like(x), conv_bias)  # conv bias and cached left context

        # Gates: block-diagonal per head, u_h (B, L, H, W) @ W_h (H, W, W) + b_h.
        H, Wd = lru.num_attention_heads, lru.block_width
        u_heads = u.transpose(1, 2).reshape(batch, L, H, Wd)

        def head_gate(weight: str, bias: str) -> Tensor:
            pre = torch.einsum("blhi,hij->blhj", u_heads, w[weight].to(dtype)) + w[bias].to(dtype)
            return torch.sigmoid(pre).reshape(batch, L, C).transpose(1, 2)  # (B, C, L)

        input_gate = head_gate("input_gate_weight", "input_gate_bias")
        recurrence_gate = head_gate("recurrent_gate_weight", "recurrent_gate_bias")
        log_decay = -8.0 * recurrence_gate * F.softplus(w["recurrent_param"].to(dtype))[None, :, None]
        at_reset = reset[:, None, :]
        normaliser = torch.where(at_reset, 1.0, torch.sqrt(1 - torch.exp(2 * log_decay)))
        log_decay = log_decay.masked_fill(at_reset, 0.0)  # resets are handled by `segment`

        state_offset = None
        h0 = record.raw.get("initial_state")
        if h0 is not None:  # y_t += exp(S_t) · [no reset in [0, t]] · h0, before the gate
            carried = torch.exp(log_decay.double().cumsum(-1)) * (segment == 0)[:, None, :]
            state_offset = (carried * h0.double()[:, :, None]).to(dtype)

        derived = dict(
            values=x,
            gate=gate,
            conv_output=u,
            input_gate=input_gate,
            recurrence_gate=recurrence_gate,
            log_decay=log_decay,
            normaliser=normaliser,
            reset=reset,
            segment=segment,
            conv=taps,
            conv_offset=conv_offset,
            state_offset=state_offset,
            heads=torch.arange(C, device=x.device) // Wd,
        )
        record.cache[dtype] = derived
        return derived

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        return Factors(
            values=d["values"],
            core=RGLRUCore(d["log_decay"], d["segment"], d["input_gate"] * d["normaliser"]),
            left={"gate": d["gate"]},
            conv=d["conv"],
            conv_offset=d["conv_offset"],
            state_offset=d["state_offset"],
            groups={"heads": d["heads"]},
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype):
        def get(key: str):
            return lambda: self.derive(record, dtype)[key]

        def decay() -> Tensor:  # a_t, 0 at resets
            d = self.derive(record, dtype)
            return torch.exp(d["log_decay"]).masked_fill(d["reset"][:, None, :], 0.0)

        def input_proj() -> Tensor:  # i_t · m_t
            d = self.derive(record, dtype)
            return d["input_gate"] * d["normaliser"]

        keys = ("values", "gate", "conv_output", "input_gate", "recurrence_gate", "normaliser", "reset")
        thunks = {k: get(k) for k in keys}

        def log_decay() -> Tensor:  # log a_t, −inf at resets
            d = self.derive(record, dtype)
            return d["log_decay"].masked_fill(d["reset"][:, None, :], float("-inf"))

        thunks.update(decay=decay, log_decay=log_decay, input_proj=input_proj)
        if "initial_state" in record.raw:
            thunks["initial_state"] = lambda: record.raw["initial_state"].to(dtype)
        return thunks
