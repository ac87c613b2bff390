"""Independent float64 re-implementations of transformers' Mamba-2 mixers and Zamba's multi-head Mamba-1
mixer, step by step.

Written from the model code, not from implicit_hooks: a plain loop over time for the conv and for the
recurrence over the SSM state ``(B, H, P, N)``, no cumulative sums, no chunks, no tiles. ``frozen`` runs
the same recurrence with every data-controlled quantity frozen at its value for the recorded call
(including the gated RMS norm's per-token scale), so feeding it unit impulses gives the columns of the
implicit attention matrix. ``final_state`` and ``tail`` let a continuation start where a call ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

f64 = torch.float64


def _w(t):
    return None if t is None else t.detach().cpu().to(f64)


def _conv(signal, taps, bias, context):
    """u[t] = Σ_i taps[:, i] · signal[t - (K-1) + i] (+ bias), reading ``context`` before position 0."""
    batch, L, C = signal.shape
    K = taps.shape[1]
    padded = torch.cat([context, signal], dim=1)  # (B, K-1+L, C)
    out = torch.zeros(batch, L, C, dtype=f64)
    for t in range(L):
        for i in range(K):
            out[:, t] += taps[:, i] * padded[:, t + i]
    return out if bias is None else out + bias


def _silu_slope(u):
    return torch.sigmoid(u)


@dataclass
class Frozen:
    """Everything one mixer call computed from its input, float64, channels last."""

    x: torch.Tensor  # (B, L, C) values: the x part of in_proj, before the conv
    z: torch.Tensor  # (B, L, C)
    u: torch.Tensor  # (B, L, C) conv output of the x channels
    mask: torch.Tensor  # (B, L)
    delta: torch.Tensor  # (B, L, H) SSD: per head; (B, L, C) Zamba: per channel
    A: torch.Tensor  # (H,) SSD; (C, N) Zamba
    B: torch.Tensor  # (B, L, H, N): B of each head (groups repeated)
    C: torch.Tensor  # (B, L, H, N)
    D: torch.Tensor  # (C,)
    taps: torch.Tensor  # (C, K) conv taps of the x channels
    conv_bias: torch.Tensor | None
    context: torch.Tensor  # (B, K-1, C) conv inputs of the x channels before position 0
    h0: torch.Tensor  # (B, H, P, N) the state this call starts from (zeros if none)
    heads: int
    norm_scale: torch.Tensor | None = None  # (B, L, C): w / rms, frozen; None when the block has no norm
    y: torch.Tensor | None = None  # the mixer output before out_proj
    final_state: torch.Tensor | None = None  # (B, H, P, N)
    tail: torch.Tensor | None = None  # (B, K-1, conv_dim) the last conv inputs, for a continuation
    per_channel: bool = False  # Zamba: Δ and A per channel, B and C per head
    delta_raw: torch.Tensor | None = None  # SSD: softplus(dt + dt_bias) before the clamp


def frozen(
    fr: Frozen,
    v,
    *,
    conv=True,
    act=True,
    ssm=True,
    skip=True,
    gate=True,
    norm=True,
    input_mask=True,
    conv_bias=False,
    context=False,
    state=False,
    return_state=False,
):
    """The mixer with every data-controlled factor frozen, applied to ``v (B, L, C)`` step by step."""
    batch, L, Cn = v.shape
    H = fr.heads
    P = Cn // H
    s = v * fr.mask[..., None] if input_mask else v
    if conv:
        ctx = fr.context if context else torch.zeros_like(fr.context)
        s = _conv(s, fr.taps, fr.conv_bias if conv_bias else None, ctx)
    a = s * (_silu_slope(fr.u) if act else 1.0) * fr.mask[..., None]
    h = fr.h0.clone() if state else torch.zeros_like(fr.h0)  # (B, H, P, N)
    out = torch.zeros(batch, L, Cn, dtype=f64)
    for t in range(L):
        x_t = a[:, t].reshape(batch, H, P)
        if fr.per_channel:  # Zamba: decay and step per channel
            delta_t = fr.delta[:, t].reshape(batch, H, P)[..., None]  # (B, H, P, 1)
            decay = torch.exp(delta_t * fr.A.reshape(H, P, -1))
        else:  # Mamba-2: one scalar decay per head
            delta_t = fr.delta[:, t][:, :, None, None]  # (B, H, 1, 1)
            decay = torch.exp(delta_t * fr.A[None, :, None, None])
        h = decay * h + delta_t * x_t[..., None] * fr.B[:, t, :, None, :]
        y_t = torch.zeros(batch, H, P, dtype=f64)
        if ssm:
            y_t = y_t + (h * fr.C[:, t, :, None, :]).sum(-1)
        if skip:
            y_t = y_t + fr.D.reshape(H, P) * x_t
        out[:, t] = y_t.reshape(batch, Cn)
    if gate:
        out = out * F.silu(fr.z)
    if norm and fr.norm_scale is not None:
        out = out * fr.norm_scale
    return (out, h) if return_state else out


def _finish(fr: Frozen, xBC_tail, norm_module=None, group=None, before_gate=False):
    """Run the full call once: the output, the frozen norm scale, the final state and the conv tail."""
    y, h = frozen(
        fr,
        fr.x,
        input_mask=False,
        conv_bias=True,
        context=True,
        state=True,
        gate=False,
        norm=False,
        return_state=True,
    )
    if norm_module is not None:
        eps = getattr(norm_module, "variance_epsilon", getattr(norm_module, "eps", None))
        normed = y if before_gate else y * F.silu(fr.z)
        batch, L, C = y.shape
        ms = normed.reshape(batch, L, C // group, group).pow(2).mean(-1, keepdim=True)
        rms_inv = torch.rsqrt(ms + eps).expand(-1, -1, -1, group).reshape(batch, L, C)
        fr.norm_scale = _w(norm_module.weight) * rms_inv
    fr.y = y * F.silu(fr.z) * (fr.norm_scale if fr.norm_scale is not None else 1.0)
    fr.final_state = h
    fr.tail = xBC_tail
    return fr


def reference(mixer, hidden, mask=None, *, context=None, h0=None, decode=False) -> Frozen:
    """Run a Mamba-2-family ``mixer`` on ``hidden (B, L, hidden)`` in float64.

    ``context (B, K-1, conv_dim)``: conv inputs before position 0 (a previous call's ``tail``);
    ``h0 (B, H, P, N)``: the state to start from; ``decode``: the single-token path (no Δ clamp there).
    """
    h = hidden.detach().to(f64)
    batch, L, _ = h.shape
    m = torch.ones(batch, L, dtype=f64) if mask is None else mask.to(f64)
    h = h * m[..., None]
    if hasattr(mixer, "ssm_in_multiplier"):  # FalconH1
        h = h * mixer.ssm_in_multiplier
    proj = F.linear(h, _w(mixer.in_proj.weight), _w(mixer.in_proj.bias))
    if getattr(mixer, "mup_vector", None) is not None:  # FalconH1
        proj = proj * _w(mixer.mup_vector)
    C, H, P = mixer.intermediate_size, mixer.num_heads, mixer.head_dim
    G, N = mixer.n_groups, mixer.ssm_state_size
    z, xBC, dt = torch.split(proj, [C, C + 2 * G * N, H], dim=-1)
    taps = _w(mixer.conv1d.weight)[:, 0, :]  # (conv_dim, K)
    K = taps.shape[1]
    ctx = torch.zeros(batch, K - 1, xBC.shape[-1], dtype=f64) if context is None else context.to(f64)
    bias = _w(mixer.conv1d.bias)
    u = _conv(xBC, taps, bias, ctx)
    assert mixer.activation == "silu"
    a = F.silu(u) * m[..., None]
    _, Bm, Cm = torch.split(a, [C, G * N, G * N], dim=-1)
    rep = H // G
    Bh = Bm.reshape(batch, L, G, 1, N).expand(-1, -1, -1, rep, -1).reshape(batch, L, H, N)
    Ch = Cm.reshape(batch, L, G, 1, N).expand(-1, -1, -1, rep, -1).reshape(batch, L, H, N)
    delta_raw = F.softplus(dt + _w(mixer.dt_bias))
    delta = delta_raw
    if not decode:  # the chunked scan clamps; the single-token state update does not
        low, high = mixer.time_step_limit
        delta = delta.clamp(min=low, max=high)
    A = -torch.exp(_w(mixer.A_log))
    D = _w(mixer.D).repeat_interleave(P)
    state = torch.zeros(batch, H, P, N, dtype=f64) if h0 is None else h0.to(f64)
    fr = Frozen(
        x=xBC[..., :C],
        z=z,
        u=u[..., :C],
        mask=m,
        delta=delta,
        A=A,
        B=Bh,
        C=Ch,
        D=D,
        taps=taps[:C],
        conv_bias=None if bias is None else bias[:C],
        context=ctx[..., :C],
        h0=state,
        heads=H,
        delta_raw=delta_raw,
    )
    norm = getattr(mixer, "norm", None)
    if norm is None or isinstance(norm, torch.nn.Identity):
        norm, group, before = None, None, False
    else:  # the model's norm: groups of `group_size` channels (or `n_groups` groups; one group if neither)
        group = getattr(norm, "group_size", None) or C // getattr(norm, "n_groups", 1)
        before = bool(getattr(norm, "norm_before_gate", False))
    tail = torch.cat([ctx, xBC], dim=1)[:, -(K - 1) :]
    return _finish(fr, tail, norm, group, before)


def zamba_reference(mixer, hidden, mask=None, *, context=None, h0=None) -> Frozen:
    """Run a ``ZambaMambaMixer`` on ``hidden (B, L, hidden)`` in float64 (``h0`` only for decode steps)."""
    h = hidden.detach().to(f64)
    batch, L, _ = h.shape
    m = torch.ones(batch, L, dtype=f64) if mask is None else mask.to(f64)
    h = h * m[..., None]
    proj = F.linear(h, _w(mixer.in_proj.weight), _w(mixer.in_proj.bias))  # (B, L, 2C)
    C, H = mixer.intermediate_size, mixer.n_mamba_heads
    P, R, N = C // H, mixer.time_step_rank, mixer.ssm_state_size
    x = proj[..., 0::2]  # x and z alternate channel by channel
    z = proj[..., 1::2]
    taps = _w(mixer.conv1d.weight)[:, 0, :]
    K = taps.shape[1]
    ctx = torch.zeros(batch, K - 1, C, dtype=f64) if context is None else context.to(f64)
    bias = _w(mixer.conv1d.bias)
    u = _conv(x, taps, bias, ctx)
    assert mixer.activation == "silu"
    xc = F.silu(u) * m[..., None]
    Bh = torch.zeros(batch, L, H, N, dtype=f64)
    Ch = torch.zeros(batch, L, H, N, dtype=f64)
    delta = torch.zeros(batch, L, C, dtype=f64)
    for head in range(H):
        xs = xc[..., head * P : (head + 1) * P]  # (B, L, P)
        dt, Bh[:, :, head], Ch[:, :, head] = torch.split(
            xs @ _w(mixer.x_proj_weight[head]).T, [R, N, N], dim=-1
        )
        dt = dt @ _w(mixer.dt_proj_weight[head]).T + _w(mixer.dt_proj_bias[head])
        delta[..., head * P : (head + 1) * P] = F.softplus(dt)
    A = -torch.exp(_w(mixer.A_log)).reshape(C, N)
    state = torch.zeros(batch, H, P, N, dtype=f64) if h0 is None else h0.to(f64)
    fr = Frozen(
        x=x,
        z=z,
        u=u,
        mask=m,
        delta=delta,
        A=A,
        B=Bh,
        C=Ch,
        D=_w(mixer.D).reshape(C),
        taps=taps,
        conv_bias=bias,
        context=ctx,
        h0=state,
        heads=H,
        per_channel=True,
    )
    tail = torch.cat([ctx, x], dim=1)[:, -(K - 1) :]
    return _finish(fr, tail)


def impulse_matrix(fr: Frozen, **parts) -> torch.Tensor:
    """``(B, C, L, L)``: column ``j`` is the frozen mixer's response to a unit impulse at ``j``."""
    batch, L, C = fr.x.shape
    out = torch.zeros(batch, C, L, L, dtype=f64)
    for j in range(L):
        e = torch.zeros(batch, L, C, dtype=f64)
        e[:, j] = 1.0
        out[:, :, :, j] = frozen(fr, e, **parts).transpose(1, 2)
    return out


def bias_reference(fr: Frozen) -> torch.Tensor:
    """``(B, C, L)``: the frozen mixer's output driven only by what is not ``P·x`` (conv bias and context,
    padded x, the initial state)."""
    return frozen(
        fr, fr.x * (1 - fr.mask[..., None]), input_mask=False, conv_bias=True, context=True, state=True
    ).transpose(1, 2)
