"""RWKV-4 time mixing of transformers' ``Rwkv``: ``RwkvSelfAttention``.

Per channel ``c`` (``docs/maths.md``), decay rate ``w = exp(time_decay) > 0``, bonus ``u = time_first``::

    y = G · R · v + bias,   G = diag(σ(r_t))
    R[t, j] = exp((j + 1 − t) · w + k_j − log Z_t)   (j < t),   R[t, t] = exp(u + k_t − log Z_t)
    Z_t     = Σ_{j<t} exp((j + 1 − t) · w + k_j) + exp(u + k_t) + b_0 · exp(p_0 − t · w)

``R`` is the normalised WKV: a softmax-like attention whose rows sum to 1 (without a carried state).
Everything is computed in log space (``log Z`` by ``logcumsumexp`` in float64, the vectorised form of the
running-maximum trick of the real kernel), so keys of ±30 and beyond never overflow. Token shift happens
before the projections, so ``k``, ``v``, ``r`` are the ``key``, ``value``, ``receptance`` outputs. A state
``(a_0, b_0, p_0)`` (numerator, denominator, maximum) carried in from a previous call adds
``a_0 · exp(p_0 − t · w − log Z_t)`` to ``bias`` (before the gate) and takes its share
``b_0 · exp(p_0 − t · w)`` of every ``Z_t``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..patcher import Patcher, require
from ..recording import BlockRecord
from ..view import Core, Factors, take

_F64 = torch.float64


def log_normaliser(key: Tensor, w: Tensor, u: Tensor, log_state_den: Tensor | None = None) -> Tensor:
    """``log Z_t`` of every row, ``(B, C, L)`` float64, without overflow for any key.

    ``key (B, C, L)``, ``w``/``u (C,)``; ``log_state_den (B, C)``: ``log b_0 + p_0`` of a carried state.
    ``Σ_{j<t} exp((j + 1 − t)·w + k_j) = exp(lse_{t−1} − (t − 1)·w)`` with ``lse = logcumsumexp(k_j + j·w)``.
    """
    key, w, u = key.to(_F64), w.to(_F64)[:, None], u.to(_F64)[:, None]
    pos = torch.arange(key.shape[-1], device=key.device, dtype=_F64)
    past = torch.logcumsumexp(key + pos * w, dim=-1) - pos * w  # row t + 1's sum over j ≤ t
    past = torch.cat([torch.full_like(past[..., :1], float("-inf")), past[..., :-1]], dim=-1)
    log_z = torch.logaddexp(past, key + u)
    if log_state_den is not None:
        log_z = torch.logaddexp(log_z, log_state_den.to(_F64)[..., None] - pos * w)
    return log_z


class WKVCore(Core):
    """``R`` of an RWKV-4 call (the normalised WKV), for any channels, rows and columns.

    Shapes: ``key (B, C, L)``, ``w``/``u (C,)``, ``log_z (B, C, L)`` float64; entries come out in ``dtype``.
    """

    work_per_entry = 6
    has_skip = False
    # a last-token row of 1024 channels on the H200: 0.17 / 0.26 / 1.34 ms by the kernel against 0.41 / 0.41 /
    # 2.29 ms by the torch path at L = 512 / 2048 / 16384, at 2 / 8 / 67 MB of peak against 19 / 76 / 157 MB
    # (benchmarks/results/gpu.md, run WW)
    fused_rows = True

    def __init__(self, key: Tensor, w: Tensor, u: Tensor, log_z: Tensor, dtype: torch.dtype):
        # contiguous once here (the recorded keys come as a transposed view), not copied by every fused read
        self.key = key.to(_F64).contiguous()
        self.w, self.u, self.log_z = w.to(_F64), u.to(_F64), log_z.contiguous()
        self.dtype = dtype

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        if not ssm:
            return torch.zeros(len(chans), len(rows), len(cols), dtype=self.dtype, device=self.key.device)
        k = self.key[b].index_select(0, chans).index_select(1, cols)[:, None, :]  # (nc, 1, ncol)
        w = self.w.index_select(0, chans)[:, None, None]
        u = self.u.index_select(0, chans)[:, None, None]
        gap = (cols[None, :] + 1 - rows[:, None]).to(_F64)  # (nr, ncol): j + 1 − t
        log_num = torch.where(rows[:, None] == cols[None, :], u + k, gap * w + k)  # (nc, nr, ncol)
        log_num = log_num.masked_fill(rows[:, None] < cols[None, :], float("-inf"))
        log_z = self.log_z[b].index_select(0, chans).index_select(1, rows)[:, :, None]
        return torch.exp(log_num - log_z).to(self.dtype)

    fused_work = 8

    def matvec(self, b: int, v: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        """``R @ v`` for every channel, ``v (C, L)``, in ``O(L)`` and in float64 log space, as
        :func:`log_normaliser` sums ``Z``: ``Σ_{j<t} exp((j + 1 − t)·w + k_j) v_j`` is the difference of the
        sums over the positive and the negative parts of ``v``, each a ``logcumsumexp``; every term is
        divided by ``Z_t`` (which holds the same exponentials) before it leaves log space."""
        if not ssm:
            return torch.zeros_like(v, dtype=self.dtype)
        key, log_z = self.key[b], self.log_z[b]  # (C, L) float64
        w, u = self.w[:, None], self.u[:, None]
        v64 = v.to(_F64)
        pos = torch.arange(v.shape[-1], device=v.device, dtype=_F64)
        log_v = torch.log(v64.abs().clamp_min(1e-300))  # clamped: finite gradients where v = 0
        out = torch.exp(u + key - log_z) * v64  # the diagonal
        for sign in (1.0, -1.0):
            # the other sign's terms pushed e^{-10⁴} down (exactly 0 once summed), not to −inf: the
            # gradient of a logcumsumexp over −inf entries is NaN
            part = torch.where(sign * v64 > 0, log_v, log_v - 1e4)
            past = torch.logcumsumexp(key + pos * w + part, dim=-1) - pos * w  # row t + 1's sum over j ≤ t
            past = torch.cat([torch.full_like(past[:, :1], float("-inf")), past[:, :-1]], dim=-1)
            out = out + sign * torch.exp(past - log_z)
        return out.to(self.dtype)

    def tiles(self, b: int, chans: Tensor | slice, **parts: Any) -> Any:
        """The fused Triton assembler (:class:`implicit_hooks.kernels.WKVTiles`): one exponential per entry
        of ``(j − t)·w + (k_j + w) − log Z_t`` (``j < t``) or ``u + k_t − log Z_t`` (``j = t``)."""
        if parts["taps"] is not None:
            return None  # RWKV-4 shifts tokens before its projections: no conv factor to fold
        from ..kernels import WKVTiles

        key, log_z = self.rows_of(b, "key", "log_z")
        return WKVTiles(
            take(key, chans),
            take(log_z, chans),
            take(self.w, chans),
            take(self.u, chans),
            left=parts["left"],
            right=parts["right"],
            input_mask=parts["input_mask"],
            ssm=parts["ssm"],
        )


class RWKV4Patcher(Patcher):
    """transformers' ``RwkvSelfAttention`` (RWKV-4 time mixing), on the CPU loop and the CUDA kernel path."""

    kind = "rwkv4"
    holds_blocks = False
    real_output_key = "output_input"

    tap_paths = {
        "key": ("key", "output"),
        "value": ("value", "output"),
        "receptance": ("receptance", "output"),
        "output_input": ("output", "input"),
    }

    weight_paths = {"time_decay": "time_decay", "time_first": "time_first"}

    def on_call(self, record: BlockRecord, args: tuple, kwargs: dict) -> None:
        hidden = self.argument("hidden", args, kwargs)
        record.raw["length"] = None if hidden is None else hidden.shape[1]
        state = self.argument("state", args, kwargs)
        if state is not None:
            # The forward writes this layer's (num, den, max) into the state in place: keep a copy (3, B, C).
            layer = self.module.layer_id
            start = torch.stack([state[i][:, :, layer] for i in (2, 3, 4)])  # a copy
            record.raw["initial_state"] = start if record.grad else start.detach()

    # --- derivation -----------------------------------------------------------------------------
    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Every per-call quantity: ``(B, C, L)`` in ``dtype`` unless noted; ``log_z`` float64 (cached)."""
        if dtype in record.cache:
            return record.cache[dtype]
        for key in ("key", "value", "receptance"):
            require(key in record.raw, f"{record.name}: {key} never ran as a module during this call")
        k = record.raw["key"].transpose(1, 2)  # (B, C, L)
        batch, C, L = k.shape
        require(
            record.raw.get("length") in (None, L),
            f"{record.name}: a single-token call with batch {batch} and a state: transformers' Rwkv "
            f"broadcasts the token-shift state across the batch (keys of shape {(batch, L, C)} for one "
            "token), so this call is not a per-sequence computation. Decode with batch 1, or pass the tokens "
            "in one call.",
        )
        w = torch.exp(record.weights["time_decay"].to(_F64))  # (C,)
        u = record.weights["time_first"].to(_F64)
        log_state_den = state_num = state_max = None
        state = record.raw.get("initial_state")
        if state is not None:
            state = state.to(_F64)  # (3, B, C): numerator, denominator, maximum
            require(
                bool((state[1] >= 0).all()),
                f"{record.name}: the carried state has a negative denominator; it is not an RWKV-4 state",
            )
            state_num, state_max = state[0], state[2]
            log_state_den = torch.log(state[1]) + state_max
        log_z = log_normaliser(k, w, u, log_state_den)

        state_offset = None
        if state is not None:  # a_0 · exp(p_0 − t·w − log Z_t)
            pos = torch.arange(L, device=k.device, dtype=_F64)
            carried = torch.exp(state_max[..., None] - pos * w[:, None] - log_z)
            state_offset = (state_num[..., None] * carried).to(dtype)

        receptance = record.raw["receptance"].transpose(1, 2).to(dtype)
        derived = dict(
            values=record.raw["value"].transpose(1, 2).to(dtype),
            key=k.to(dtype),
            key_f64=k.to(_F64).contiguous(),  # row-major: the core keeps it, not a copy
            receptance=receptance,
            gate=torch.sigmoid(receptance).contiguous(),  # row-major: Factors keep it, not a copy
            w=w,
            u=u,
            log_z=log_z,
            state_offset=state_offset,
        )
        record.cache[dtype] = derived
        return derived

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        return Factors(
            values=d["values"],
            core=WKVCore(d["key_f64"], d["w"], d["u"], d["log_z"], dtype),
            left={"gate": d["gate"]},
            state_offset=d["state_offset"],
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype):
        def get(key: str, cast: bool = False):
            return lambda: (
                self.derive(record, dtype)[key].to(dtype) if cast else self.derive(record, dtype)[key]
            )

        thunks = {k: get(k) for k in ("values", "key", "receptance", "gate")}
        thunks.update(
            decay=lambda: torch.exp(-self.derive(record, dtype)["w"]).to(dtype),  # (C,) per-step state decay
            decay_rate=get("w", cast=True),  # (C,) w = exp(time_decay)
            bonus=get("u", cast=True),  # (C,)
            log_normaliser=get("log_z", cast=True),  # (B, C, L)
        )
        if "initial_state" in record.raw:
            thunks["initial_state"] = lambda: record.raw["initial_state"].to(dtype)  # (3, B, C)
        return thunks
