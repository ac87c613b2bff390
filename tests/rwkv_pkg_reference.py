"""An independent float64 re-implementation of the ``rwkv`` package's time mixing (v4 … v7).

Written from the package's ``rwkv/model.py``, not from implicit_hooks: layer norm, token shift, projections,
then a plain loop over time for the recurrence (v4: the running-maximum WKV; v5/v6: the matrix state
``s = k vᵀ + w ⊙ s``; v7: ``S = S diag(w) + S (−κ)(κ ⊙ a)ᵀ + v kᵀ``), the group norm and the gate.
``frozen`` runs the recurrence with every data-controlled quantity frozen at its value for the recorded
call (the group norm's mean and scale too), so feeding it unit impulses gives the columns of the implicit
attention matrix.

``capture`` is a test-owned interception of the same calls (wrappers on the instance for v4–v6, a mirror of
``forward_seq``/``forward_one`` for v7) that keeps each layer's inputs and outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

f64 = torch.float64
EPS_GN = 64e-5

_Q = ("mx", "rx", "my", "ry")


def _quant(*names):
    return [f"{n}{q}" for n in names for q in _Q]


#: argument names of the package's time-mix methods (rwkv 0.8.32, model.py)
PARAMS = {
    4: ["x", "sx", "aa", "bb", "pp", "ln_w", "ln_b", "k_mix", "v_mix", "r_mix", "t_decay", "t_first"]
    + ["kw", "vw", "rw", "ow"]
    + _quant("k", "v", "r", "o"),
    5: ["x", "sx", "s", "ln_w", "ln_b", "lx_w", "lx_b", "k_mix", "v_mix", "r_mix", "t_decay", "t_first"]
    + ["kw", "vw", "rw", "ow"]
    + _quant("k", "v", "r", "o"),
    5.1: ["x", "sx", "s", "ln_w", "ln_b", "lx_w", "lx_b", "k_mix", "v_mix", "r_mix", "g_mix", "t_decay"]
    + ["t_first", "kw", "vw", "rw", "gw", "ow"]
    + _quant("k", "v", "r", "g", "o"),
    6: ["x", "sx", "s", "ln_w", "ln_b", "lx_w", "lx_b", "x_maa", "w_maa", "k_maa", "v_maa", "r_maa", "g_maa"]
    + ["tm_w1", "tm_w2", "td_w1", "td_w2", "t_decay", "t_first", "kw", "vw", "rw", "gw", "ow"]
    + _quant("k", "v", "r", "g", "o"),
}
METHODS = {
    4.0: ("att_seq", "att_one"),
    5.0: ("att_seq_v5", "att_one_v5"),
    5.1: ("att_seq_v5_1", "att_one_v5_1"),
    5.2: ("att_seq_v5_2", "att_one_v5_1"),
    6.0: ("att_seq_v6_0", "att_one_v6_0"),
}
V7_WEIGHTS = [
    *("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2"),
    *("g1", "g2", "k_k", "k_a", "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight"),
    *("ln_x.weight", "ln_x.bias"),
]
V7_NAMES = ["layer_id", "H", "N", "x", "x_prev", "v_first", "state"] + V7_WEIGHTS


def _params(version):
    if version == 4:
        return PARAMS[4]
    if version == 5:
        return PARAMS[5]
    if version in (5.1, 5.2):
        return PARAMS[5.1]
    return PARAMS[6]


def is_v7(model):
    return hasattr(model, "z")


@contextlib.contextmanager
def capture(model):
    """Each time mix call as ``{"layer", "version", "args": {name: tensor}, "out": ...}``, in call order."""
    calls = []
    patched = []
    if is_v7(model):
        g = type(model).forward.__globals__

        def run(x, state, path):
            z = model.z
            tmix = g["RWKV_x070_TMix_" + path]
            cmix = g["RWKV_x070_CMix_" + path]
            v_first = torch.empty_like(x)
            for i in range(model.n_layer):
                b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
                xx = F.layer_norm(x, (model.n_embd,), weight=z[b + "ln1.weight"], bias=z[b + "ln1.bias"])
                args = [i, model.n_head, model.head_size, xx, state[i * 3], v_first, state[i * 3 + 1]]
                args += [z[a + n] for n in V7_WEIGHTS]
                named = dict(zip(V7_NAMES, args))
                named["state"] = named["state"].clone()
                out = tmix(*args)
                calls.append({"layer": i, "version": 7.0, "args": named, "out": out})
                xx, state[i * 3], state[i * 3 + 1], v_first = out
                x = x + xx
                xx = F.layer_norm(x, (model.n_embd,), weight=z[b + "ln2.weight"], bias=z[b + "ln2.bias"])
                xx, state[i * 3 + 2] = cmix(
                    xx, state[i * 3 + 2], z[f + "x_k"], z[f + "key.weight"], z[f + "value.weight"]
                )
                x = x + xx
            return x

        def seq(idx, state, full_output=False):
            with torch.no_grad():
                x = run(model.z["emb.weight"][idx], state, "seq")
                x = x if full_output else x[-1, :]
                x = F.layer_norm(
                    x, (model.n_embd,), weight=model.z["ln_out.weight"], bias=model.z["ln_out.bias"]
                )
                return x @ model.z["head.weight"], state

        def one(idx, state):
            with torch.no_grad():
                x = run(model.z["emb.weight"][idx], state, "one")
                x = F.layer_norm(
                    x, (model.n_embd,), weight=model.z["ln_out.weight"], bias=model.z["ln_out.bias"]
                )
                return x @ model.z["head.weight"], state

        patched = [("forward_seq", seq), ("forward_one", one)]
    else:
        version = float(model.version)
        names = _params(version)
        layer_of = {id(model.w[f"blocks.{i}.ln1.weight"]): i for i in range(model.args.n_layer)}

        def make(original):
            def wrapper(*args):
                named = dict(zip(names, args))
                named = {k: (v.clone() if k in ("aa", "bb", "pp", "s") else v) for k, v in named.items()}
                out = original(*args)
                calls.append(
                    {"layer": layer_of[id(named["ln_w"])], "version": version, "args": named, "out": out}
                )
                return out

            return wrapper

        patched = [(m, make(getattr(model, m))) for m in METHODS[version]]
    for name, fn in patched:
        model.__dict__[name] = fn
    try:
        yield calls
    finally:
        for name, _ in patched:
            model.__dict__.pop(name, None)


@dataclass
class Frozen:
    """Everything a time mix computed from its input, float64, channels last ``(L, C)`` unless noted."""

    version: float
    H: int
    N: int
    r: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor | None  # the factor multiplying the output (σ(r) in v4, SiLU(g), g in v7)
    decay: torch.Tensor  # (L, C) per-step decay w (v4: exp(−w) per step)
    bonus: torch.Tensor  # v4: u (C,); v5/6: u (C,); v7: r_k (C,)
    gamma: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    state: tuple | torch.Tensor | None = None  # the state the call starts from
    kappa: torch.Tensor | None = None  # v7
    a: torch.Tensor | None = None  # v7
    mean: torch.Tensor | None = None  # (L, H) frozen group norm
    std: torch.Tensor | None = None
    y: torch.Tensor | None = None  # the real output before the output projection, (L, C)
    extra: dict = field(default_factory=dict)


def _w(t):
    return t.detach().cpu().to(f64)


def _mm(a, args, name):
    w = args[name + "w"]
    assert w.dtype != torch.uint8, "the reference reads float weights only"
    return a @ _w(w)


def reference(call) -> Frozen:
    """The float64 time mix of one captured call."""
    if call["version"] == 7.0:
        return _reference_v7(call)
    version, n = call["version"], call["args"]
    x = _w(n["x"])
    x = x[None] if x.dim() == 1 else x
    L, C = x.shape
    xx = F.layer_norm(x, (C,), weight=_w(n["ln_w"]), bias=_w(n["ln_b"]))
    prev = torch.cat([_w(n["sx"])[None], xx[:-1]])
    if version == 6.0:
        dx = prev - xx
        mix = torch.tanh((xx + dx * _w(n["x_maa"])) @ _w(n["tm_w1"])).view(L, 5, -1)
        m = torch.einsum("tfd,fdc->ftc", mix, _w(n["tm_w2"]))
        inputs = {p: xx + dx * (_w(n[f"{p}_maa"]) + m[i]) for i, p in enumerate("wkvrg")}
    else:
        inputs = {
            p: xx * _w(n[f"{p}_mix"]) + prev * (1 - _w(n[f"{p}_mix"])) for p in "kvrg" if f"{p}_mix" in n
        }
    r = _mm(inputs["r"], n, "r")
    k = _mm(inputs["k"], n, "k")
    v = _mm(inputs["v"], n, "v")
    if version == 4.0:
        fr = Frozen(
            4.0, 1, C, r, k, v, torch.sigmoid(r), torch.exp(_w(n["t_decay"])).expand(L, C), _w(n["t_first"])
        )
        fr.state = tuple(_w(n[s]) for s in ("aa", "bb", "pp"))
        fr.y = frozen(fr, v, affine=True)
        return fr
    H = _w(n["t_decay"]).shape[0]
    N = C // H
    gate = F.silu(_mm(inputs["g"], n, "g")) if "gw" in n else None
    if version == 6.0:
        z = _w(n["t_decay"]).reshape(C) + torch.tanh(inputs["w"] @ _w(n["td_w1"])) @ _w(n["td_w2"])
        decay = torch.exp(-torch.exp(z))  # (L, C)
    else:  # stored as exp(−exp(time_decay)), one per head (v5, v5.1) or per channel (v5.2)
        decay = _w(n["t_decay"]).reshape(H, -1).expand(H, N).reshape(C).expand(L, C)
    bonus = _w(n["t_first"]).reshape(H, -1).expand(H, N).reshape(C)
    fr = Frozen(version, H, N, r, k, v, gate, decay, bonus, _w(n["lx_w"]), _w(n["lx_b"]), _w(n["s"]))
    mixed = _wkv(fr, v[None], state=True)[0]  # (L, C) before the group norm
    groups = mixed.view(L, H, N)
    fr.mean = groups.mean(-1)
    fr.std = torch.sqrt(groups.var(-1, unbiased=False) + EPS_GN)
    fr.y = frozen(fr, v, affine=True)
    return fr


def _reference_v7(call) -> Frozen:
    n = {k: (_w(t) if isinstance(t, torch.Tensor) else t) for k, t in call["args"].items()}
    layer, H, N = n["layer_id"], n["H"], n["N"]
    x = n["x"] if n["x"].dim() == 2 else n["x"][None]
    L, C = x.shape
    dx = torch.cat([n["x_prev"][None], x[:-1]]) - x
    xr, xw, xk, xv, xa, xg = (x + dx * n[p] for p in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
    r = xr @ n["receptance.weight"]
    k = xk @ n["key.weight"]
    v = xv @ n["value.weight"]
    a = torch.sigmoid(n["a0"] + (xa @ n["a1"]) @ n["a2"])
    g = torch.sigmoid(xg @ n["g1"]) @ n["g2"]
    kk = k * n["k_k"]
    kappa = (kk.view(L, H, N) / kk.view(L, H, N).norm(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(L, C)
    k = k * (1 + (a - 1) * n["k_a"])
    if layer > 0:
        v_first = n["v_first"] if n["v_first"].dim() == 2 else n["v_first"][None]
        v = v + (v_first - v) * torch.sigmoid(n["v0"] + (xv @ n["v1"]) @ n["v2"])
    decay = torch.exp(-0.606531 * torch.sigmoid(n["w0"] + torch.tanh(xw @ n["w1"]) @ n["w2"]))
    fr = Frozen(
        7.0, H, N, r, k, v, g, decay, n["r_k"].reshape(C), n["ln_x.weight"], n["ln_x.bias"], n["state"]
    )
    fr.kappa, fr.a = kappa, a
    mixed = _wkv(fr, v[None], state=True)[0]
    groups = mixed.view(L, H, N)
    fr.mean = groups.mean(-1)
    fr.std = torch.sqrt(groups.var(-1, unbiased=False) + EPS_GN)
    fr.y = frozen(fr, v, affine=True)
    return fr


def _wkv(fr: Frozen, v, *, state: bool, ssm: bool = True, skip: bool = True):
    """The recurrence's mixed output before any norm, for a batch of value sequences ``v (M, L, C)``.

    v4: the normalised WKV (``skip`` unused: the bonus is inside the softmax-like normalisation).
    v5/v6: ``r_t (u ⊙ k_t v_tᵀ + s_{t−1})`` with the bonus as ``skip``. v7: ``S_t r_t``.
    """
    M, L, C = v.shape
    H, N = fr.H, fr.N
    out = torch.zeros(M, L, C, dtype=f64)
    if fr.version == 4.0:
        aa, bb, pp = fr.state
        num = (aa if state else torch.zeros_like(aa)).expand(M, C).clone()
        den, mx = bb.expand(M, C).clone(), pp.expand(M, C).clone()
        w, u = torch.log(fr.decay[0]), fr.bonus  # the package's t_decay = −exp(time_decay) = log of the decay
        for t in range(L):
            kt = fr.k[t]
            top = torch.maximum(mx, u + kt)
            e1, e2 = torch.exp(mx - top), torch.exp(u + kt - top)
            out[:, t] = (e1 * num + e2 * v[:, t]) / (e1 * den + e2)
            top = torch.maximum(mx + w, kt)
            e1, e2 = torch.exp(mx + w - top), torch.exp(kt - top)
            num, den, mx = e1 * num + e2 * v[:, t], e1 * den + e2, top
        return out
    if fr.version == 7.0:
        S = fr.state.expand(M, H, N, N).clone() if state else torch.zeros(M, H, N, N, dtype=f64)
        for t in range(L):
            w = fr.decay[t].view(H, 1, N)
            kap = fr.kappa[t].view(H, N)
            ab = (-kap)[:, :, None] * (kap * fr.a[t].view(H, N))[:, None, :]  # (H, N, N)
            S = S * w + S @ ab + v[:, t].view(M, H, N, 1) * fr.k[t].view(1, H, 1, N)
            out[:, t] = (S @ fr.r[t].view(H, N, 1)).view(M, C)
        return out
    s = fr.state.expand(M, H, N, N).clone() if state else torch.zeros(M, H, N, N, dtype=f64)
    u = fr.bonus.view(H, N, 1)
    for t in range(L):
        kv = fr.k[t].view(1, H, N, 1) * v[:, t].view(M, H, 1, N)  # (M, H, N_key, N_value)
        read = torch.zeros_like(s)
        if ssm:
            read = read + s
        if skip:
            read = read + u * kv
        out[:, t] = (fr.r[t].view(1, H, 1, N) @ read).view(M, C)
        s = kv + fr.decay[t].view(1, H, N, 1) * s
    return out


def frozen(fr: Frozen, v, *, ssm=True, skip=True, norm=True, gate=True, affine=False):
    """The time mix with every data-controlled factor frozen, applied to values ``v ((M,) L, C)``.

    ``affine`` adds what does not come from ``v``: the carried state, the group norm's mean and its bias.
    """
    single = v.dim() == 2
    v = v[None] if single else v
    M, L, C = v.shape
    H, N = fr.H, fr.N
    if fr.version == 4.0:
        out = _wkv(fr, v, state=affine) if ssm else torch.zeros_like(v)
    elif fr.version == 7.0:
        o = _wkv(fr, v, state=affine and ssm) if ssm else torch.zeros_like(v)
        if affine and ssm:
            o = o - fr.mean.repeat_interleave(N, 1)
        out = o * (fr.gamma / fr.std.repeat_interleave(N, 1)) if norm else o
        if affine:
            out = out + fr.beta
        if skip:
            rho = (fr.r * fr.k * fr.bonus).view(L, H, N).sum(-1).repeat_interleave(N, 1)  # (L, C)
            out = out + rho * v
    else:
        o = _wkv(fr, v, state=affine and ssm, ssm=ssm, skip=skip)
        if affine:
            o = o - fr.mean.repeat_interleave(N, 1)
        out = o * (fr.gamma / fr.std.repeat_interleave(N, 1)) if norm else o
        if affine:
            out = out + fr.beta
    if gate and fr.gate is not None:
        out = out * fr.gate
    return out[0] if single else out


def impulse_matrix(fr: Frozen, **parts) -> torch.Tensor:
    """``(1, C, L, L)``: column ``j`` is the frozen time mix's response to a unit impulse value at ``j``."""
    L, C = fr.v.shape
    impulses = torch.zeros(L, L, C, dtype=f64)
    impulses[torch.arange(L), torch.arange(L)] = 1.0
    response = frozen(fr, impulses, **parts)  # (j, t, c)
    return response.permute(2, 1, 0)[None]


def bias_reference(fr: Frozen, **parts) -> torch.Tensor:
    """``(1, C, L)``: the frozen time mix driven only by what is not ``v`` (state, norm mean and bias)."""
    return frozen(fr, torch.zeros_like(fr.v), affine=True, **parts).T[None]
