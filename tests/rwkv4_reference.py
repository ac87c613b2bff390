"""An independent float64 re-implementation of transformers' ``RwkvSelfAttention``, step by step.

Written from the model code (``extract_key_value`` and ``rwkv_linear_attention_cpu``), not from
implicit_hooks: token shift, projections, then a plain loop over time with the running-maximum trick of the
real kernel. ``frozen`` runs the same WKV with the keys (hence every denominator) frozen at their values
for the recorded call, so feeding it unit impulses as values gives the columns of the implicit attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

f64 = torch.float64


def _w(t):
    return t.detach().cpu().to(f64)


@dataclass
class Frozen:
    """Everything the time mixing computed from its input, float64, channels last: (B, L, C)."""

    key: torch.Tensor
    value: torch.Tensor
    receptance: torch.Tensor  # σ(receptance(...)), the gate
    w: torch.Tensor  # (C,) exp(time_decay)
    u: torch.Tensor  # (C,) time_first
    num: torch.Tensor  # (B, C) carried state: numerator, denominator, maximum
    den: torch.Tensor
    max: torch.Tensor
    y: torch.Tensor = None  # receptance * wkv: the input of the output projection


def reference(att, hidden, state=None) -> Frozen:
    """Run ``att`` on ``hidden (B, L, H)``; ``state``: ``(shift, num, den, max)`` each ``(B, C)``, or None."""
    h = hidden.detach().cpu().to(f64)
    batch, L, H = h.shape
    shifted = torch.zeros_like(h)
    shifted[:, 1:] = h[:, :-1]
    if state is not None:
        shifted[:, 0] = state[0].cpu().to(f64)

    def mix(name):
        m = _w(getattr(att, f"time_mix_{name}"))
        return h * m + shifted * (1 - m)

    key = mix("key") @ _w(att.key.weight).T
    value = mix("value") @ _w(att.value.weight).T
    receptance = torch.sigmoid(mix("receptance") @ _w(att.receptance.weight).T)
    C = key.shape[-1]
    if state is None:  # the kernel's fresh state
        num, den, mx = (
            torch.zeros(batch, C, dtype=f64),
            torch.zeros(batch, C, dtype=f64),
            torch.full((batch, C), -1e38),
        )
    else:
        num, den, mx = (s.cpu().to(f64) for s in state[1:])
    fr = Frozen(
        key, value, receptance, torch.exp(_w(att.time_decay)), _w(att.time_first), num, den, mx.to(f64)
    )
    fr.y = frozen(fr, value, state_num=True)
    return fr


def frozen(fr: Frozen, v, *, gate=True, state_num=False):
    """The WKV with frozen keys applied to values ``v (B, L, C)``, with the running maximum of the kernel."""
    batch, L, C = v.shape
    num = fr.num.clone() if state_num else torch.zeros(batch, C, dtype=f64)
    den, mx = fr.den.clone(), fr.max.clone()
    out = torch.zeros(batch, L, C, dtype=f64)
    for t in range(L):
        k = fr.key[:, t]
        top = torch.maximum(mx, k + fr.u)
        e1, e2 = torch.exp(mx - top), torch.exp(k + fr.u - top)
        out[:, t] = (e1 * num + e2 * v[:, t]) / (e1 * den + e2)
        top = torch.maximum(mx - fr.w, k)
        e1, e2 = torch.exp(mx - fr.w - top), torch.exp(k - top)
        num = e1 * num + e2 * v[:, t]
        den = e1 * den + e2
        mx = top
    return out * fr.receptance if gate else out


def impulse_matrix(fr: Frozen, **parts) -> torch.Tensor:
    """``(B, C, L, L)``: column ``j`` is the frozen WKV's response to a unit impulse value at ``j``."""
    batch, L, C = fr.value.shape
    out = torch.zeros(batch, C, L, L, dtype=f64)
    for j in range(L):
        e = torch.zeros(batch, L, C, dtype=f64)
        e[:, j] = 1.0
        out[:, :, :, j] = frozen(fr, e, **parts).transpose(1, 2)
    return out


def bias_reference(fr: Frozen, **parts) -> torch.Tensor:
    """``(B, C, L)``: the frozen WKV driven only by the carried numerator (zero values)."""
    return frozen(fr, torch.zeros_like(fr.value), state_num=True, **parts).transpose(1, 2)
