"""An independent float64 re-implementation of transformers' Mamba-1 mixers, step by step.

Written from the model code, not from implicit_hooks: a plain loop over time for the conv and the
recurrence, no cumulative sums, no tiles. ``frozen`` runs the same recurrence with every
data-controlled quantity frozen at its value for the recorded call, so feeding it unit impulses gives
the columns of the implicit attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

f64 = torch.float64


def _w(t):
    return None if t is None else t.detach().cpu().to(f64)


@dataclass
class Frozen:
    """Everything the mixer computed from its input, float64, channels last: (B, L, C) or (B, L, N)."""

    x: torch.Tensor
    z: torch.Tensor
    u: torch.Tensor
    mask: torch.Tensor  # (B, L), ones when no padding
    delta: torch.Tensor
    A: torch.Tensor  # (C, N)
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    taps: torch.Tensor  # (C, K)
    conv_bias: torch.Tensor | None
    context: torch.Tensor  # (B, K-1, C) conv inputs before position 0
    y: torch.Tensor  # the mixer output before out_proj


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


def _rms(t, eps, weight=None):
    out = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def reference(mixer, hidden, mask=None, *, norm=None, context=None) -> Frozen:
    """Run ``mixer`` on ``hidden (B, L, H)`` in float64; ``norm`` is None, "weightless" or "weighted"."""
    h = hidden.detach().to(f64)
    batch, L, _ = h.shape
    m = torch.ones(batch, L, dtype=f64) if mask is None else mask.to(f64)
    h = h * m[..., None]
    xz = F.linear(h, _w(mixer.in_proj.weight), _w(mixer.in_proj.bias))
    x, z = xz.chunk(2, dim=-1)
    taps = _w(mixer.conv1d.weight)[:, 0, :]
    K, C = taps.shape[1], taps.shape[0]
    ctx = torch.zeros(batch, K - 1, C, dtype=f64) if context is None else context.to(f64)
    bias = _w(mixer.conv1d.bias)
    u = _conv(x, taps, bias, ctx)
    xc = F.silu(u) * m[..., None]
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, Cm = torch.split(F.linear(xc, _w(mixer.x_proj.weight)), [R, N, N], dim=-1)
    if norm is not None:
        eps = getattr(mixer.b_layernorm, "variance_epsilon", getattr(mixer.b_layernorm, "eps", None))
        weighted = norm == "weighted"
        dt = _rms(dt, eps, _w(mixer.dt_layernorm.weight) if weighted else None)
        B = _rms(B, eps, _w(mixer.b_layernorm.weight) if weighted else None)
        Cm = _rms(Cm, eps, _w(mixer.c_layernorm.weight) if weighted else None)
    delta = F.softplus(F.linear(dt, _w(mixer.dt_proj.weight), _w(mixer.dt_proj.bias)))
    A = -torch.exp(_w(mixer.A_log))
    D = _w(mixer.D)
    fr = Frozen(x, z, u, m, delta, A, B, Cm, D, taps, bias, ctx, y=None)
    fr.y = frozen(fr, x, input_mask=False, conv_bias=True, context=True)
    return fr


def frozen(
    fr: Frozen,
    v,
    *,
    conv=True,
    act=True,
    ssm=True,
    skip=True,
    gate=True,
    input_mask=True,
    conv_bias=False,
    context=False,
):
    """The mixer with every data-controlled factor frozen, applied to ``v (B, L, C)`` step by step."""
    batch, L, C = v.shape
    s = v * fr.mask[..., None] if input_mask else v
    if conv:
        ctx = fr.context if context else torch.zeros_like(fr.context)
        s = _conv(s, fr.taps, fr.conv_bias if conv_bias else None, ctx)
    a = s * (torch.sigmoid(fr.u) if act else 1.0) * fr.mask[..., None]
    state = torch.zeros(batch, C, fr.A.shape[1], dtype=f64)
    out = torch.zeros(batch, L, C, dtype=f64)
    for t in range(L):
        decay = torch.exp(fr.delta[:, t, :, None] * fr.A)  # (B, C, N)
        state = decay * state + fr.delta[:, t, :, None] * fr.B[:, t, None, :] * a[:, t, :, None]
        if ssm:
            out[:, t] += (state * fr.C[:, t, None, :]).sum(-1)
        if skip:
            out[:, t] += fr.D * a[:, t]
    return out * F.silu(fr.z) if gate else out


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
    """``(B, C, L)``: the frozen mixer's output driven only by what is not ``P·x`` (conv bias, padded x)."""
    return frozen(
        fr, fr.x * (1 - fr.mask[..., None]), input_mask=False, conv_bias=True, context=True
    ).transpose(1, 2)
