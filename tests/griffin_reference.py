"""An independent float64 re-implementation of transformers' RecurrentGemma recurrent block, step by step.

Written from the model code (``RecurrentGemmaRecurrentBlock``, ``RecurrentGemmaRglru``), not from
implicit_hooks: a plain loop over time for the conv and the recurrence, a loop over heads for the gates, no
cumulative sums, no tiles. ``frozen`` runs the same recurrence with every data-controlled quantity frozen at
its value for the recorded call, so feeding it unit impulses gives the columns of the implicit attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

f64 = torch.float64


def _w(t):
    return None if t is None else t.detach().cpu().to(f64)


def gelu(y, name: str):
    """The activations RecurrentGemma configs use, written out."""
    if name == "gelu_pytorch_tanh":
        return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    if name == "gelu":
        return 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    raise NotImplementedError(name)


@dataclass
class Frozen:
    """Everything the block computed from its input, float64, channels last: (B, L, C)."""

    x: torch.Tensor  # linear_x output, before the conv
    gate: torch.Tensor  # GeLU(linear_y)
    u: torch.Tensor  # conv output (the RG-LRU input)
    input_gate: torch.Tensor
    recurrence_gate: torch.Tensor
    a: torch.Tensor  # decay, 0 at resets
    norm: torch.Tensor  # sqrt(1 - a²), 1 at resets
    taps: torch.Tensor  # (C, K)
    conv_bias: torch.Tensor
    context: torch.Tensor  # (B, K-1, C) conv inputs before position 0
    h0: torch.Tensor  # (B, C) recurrent state before position 0
    y: torch.Tensor = None  # the block output before linear_out


def _conv(signal, taps, bias, context):
    """u[t] = Σ_i taps[:, i] · signal[t - (K-1) + i] (+ bias), reading ``context`` before position 0."""
    batch, L, C = signal.shape
    K = taps.shape[1]
    padded = torch.cat([context, signal], dim=1)
    out = torch.zeros(batch, L, C, dtype=f64)
    for t in range(L):
        for i in range(K):
            out[:, t] += taps[:, i] * padded[:, t + i]
    return out if bias is None else out + bias


def reference(
    block, hidden, position_ids, *, activation="gelu_pytorch_tanh", context=None, h0=None
) -> Frozen:
    """Run ``block`` on ``hidden (B, L, H)`` in float64; optional ``context (B, K-1, C)``, ``h0 (B, C)``."""
    h = hidden.detach().cpu().to(f64)
    batch, L, _ = h.shape
    x = torch.nn.functional.linear(h, _w(block.linear_x.weight), _w(block.linear_x.bias))
    gate = gelu(torch.nn.functional.linear(h, _w(block.linear_y.weight), _w(block.linear_y.bias)), activation)
    taps = _w(block.conv_1d.weight)[:, 0, :]
    C, K = taps.shape
    ctx = torch.zeros(batch, K - 1, C, dtype=f64) if context is None else context.cpu().to(f64)
    bias = _w(block.conv_1d.bias)
    u = _conv(x, taps, bias, ctx)

    lru = block.rg_lru
    H, W = lru.num_attention_heads, lru.block_width
    input_gate = torch.zeros_like(u)
    recurrence_gate = torch.zeros_like(u)
    for hd in range(H):  # block-diagonal gate weights, one head at a time
        part = slice(hd * W, (hd + 1) * W)
        input_gate[..., part] = torch.sigmoid(
            u[..., part] @ _w(lru.input_gate_weight[hd]) + _w(lru.input_gate_bias[hd])
        )
        recurrence_gate[..., part] = torch.sigmoid(
            u[..., part] @ _w(lru.recurrent_gate_weight[hd]) + _w(lru.recurrent_gate_bias[hd])
        )
    softplus = torch.log1p(torch.exp(_w(lru.recurrent_param)))
    a = torch.exp(-8.0 * recurrence_gate * softplus)
    reset = (position_ids.cpu() == 0).expand(batch, L)[..., None]
    norm = torch.where(reset, torch.ones_like(a), torch.sqrt(1 - a * a))
    a = torch.where(reset, torch.zeros_like(a), a)
    state = torch.zeros(batch, C, dtype=f64) if h0 is None else h0.cpu().to(f64)
    fr = Frozen(x, gate, u, input_gate, recurrence_gate, a, norm, taps, bias, ctx, state)
    fr.y = frozen(fr, x, conv_bias=True, context=True, state=True)
    return fr


def frozen(fr: Frozen, v, *, conv=True, ssm=True, gate=True, conv_bias=False, context=False, state=False):
    """The block with every data-controlled factor frozen, applied to ``v (B, L, C)`` step by step."""
    batch, L, C = v.shape
    s = v
    if conv:
        ctx = fr.context if context else torch.zeros_like(fr.context)
        s = _conv(s, fr.taps, fr.conv_bias if conv_bias else None, ctx)
    h = fr.h0.clone() if state else torch.zeros(batch, C, dtype=f64)
    out = torch.zeros(batch, L, C, dtype=f64)
    for t in range(L):
        h = fr.a[:, t] * h + fr.input_gate[:, t] * fr.norm[:, t] * s[:, t]
        if ssm:
            out[:, t] = h
    return out * fr.gate if gate else out


def impulse_matrix(fr: Frozen, **parts) -> torch.Tensor:
    """``(B, C, L, L)``: column ``j`` is the frozen block's response to a unit impulse at ``j``."""
    batch, L, C = fr.x.shape
    out = torch.zeros(batch, C, L, L, dtype=f64)
    for j in range(L):
        e = torch.zeros(batch, L, C, dtype=f64)
        e[:, j] = 1.0
        out[:, :, :, j] = frozen(fr, e, **parts).transpose(1, 2)
    return out


def bias_reference(fr: Frozen, **parts) -> torch.Tensor:
    """``(B, C, L)``: the frozen block driven only by the conv bias, conv context and initial state."""
    zero = torch.zeros_like(fr.x)
    return frozen(fr, zero, conv_bias=True, context=True, state=True, **parts).transpose(1, 2)
