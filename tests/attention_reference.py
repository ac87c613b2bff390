"""An independent float64 softmax attention, written from the model files, for the attention tests.

It reads nothing that implicit_hooks computes: queries, keys and values come from the module's own
projections applied to the captured hidden states, RoPE is re-implemented here, and the mask is built
from positions, the 2-D padding mask and the sliding window (never from the model's 4-D mask).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``r`` dims of ``x (B, H, L, d)`` (rotate-half form); ``cos, sin (B, L, r)``."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos[:, None] + rotated * sin[:, None], xp], dim=-1)


def scale_of(family: str, module) -> float:
    """The logit scale, from the config (as each model file defines it)."""
    cfg = module.config
    if family in ("zamba", "zamba2"):
        return (cfg.attention_head_dim / 2) ** -0.5
    if family == "granite":
        return cfg.attention_multiplier
    return module.head_dim**-0.5


@contextlib.contextmanager
def capture_attention(model, cls):
    """Our own hooks: per call of a ``cls`` module, its inputs, its returned weights and o_proj's input."""
    calls, handles = [], []

    def pre(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append(
            {
                "module": mod,
                "hidden": hidden.detach(),
                "position_ids": kwargs.get("position_ids"),
                "position_embeddings": kwargs.get("position_embeddings"),
                "layer_idx": kwargs.get("layer_idx", getattr(mod, "layer_idx", None)),
            }
        )

    def post(mod, args, kwargs, out):
        calls[-1]["weights"] = out[1]

    def o_proj(mod, args, out):
        calls[-1]["y"] = args[0].detach()

    for mod in model.modules():
        if isinstance(mod, cls):
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
            handles.append(mod.o_proj.register_forward_hook(o_proj))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@dataclass
class Reference:
    probs: torch.Tensor  # (B, H, L, P + L) over every key of the sequence so far
    values: torch.Tensor  # (B, H, P + L, d): each query head's values
    past: int  # P
    head_dim: int

    @property
    def matrix(self) -> torch.Tensor:
        """``(B, H·d, L, L)``: this call's causal columns, one copy per channel of the head."""
        A = self.probs[..., self.past :].tril()
        return A.repeat_interleave(self.head_dim, dim=1)

    @property
    def bias(self) -> torch.Tensor:
        """``(B, H·d, L)``: what rows take from keys outside the matrix (earlier calls, later positions)."""
        B, H, L, K = self.probs.shape
        t = torch.arange(L)[:, None] + self.past
        j = torch.arange(K)[None, :]
        outside = (j < self.past) | (j > t)
        out = torch.einsum("bhtj,bhjd->bhtd", self.probs * outside, self.values)
        return out.transpose(2, 3).reshape(B, H * self.head_dim, L)

    @property
    def output(self) -> torch.Tensor:
        """``(B, H·d, L)``: the attention output before o_proj."""
        B, H, L, _ = self.probs.shape
        out = torch.einsum("bhtj,bhjd->bhtd", self.probs, self.values)
        return out.transpose(2, 3).reshape(B, H * self.head_dim, L)


def reference(
    family: str,
    calls: list[dict],
    padding: torch.Tensor | None,
    *,
    implementation: str,
    window: int | None = None,
    use_rope: bool = True,
) -> Reference:
    """Softmax attention of the last call in ``calls`` (earlier ones: the same layer's previous calls).

    ``padding``: ``(B, P + L)`` 2-D mask over the whole sequence so far (1 = real token), or None.
    A query row with no visible key is ``1 / (P + L)`` everywhere for eager attention (its additive mask
    absorbs the logits) and zero for SDPA with a boolean mask (torch's convention).
    """
    mod = calls[-1]["module"]
    d = mod.head_dim
    qs, ks, vs = [], [], []
    with torch.no_grad():
        for call in calls:
            h = call["hidden"]
            q, k, v = mod.q_proj(h), mod.k_proj(h), mod.v_proj(h)
            if family == "zamba2" and mod.config.use_shared_attention_adapter:
                i = mod.layer_dic[call["layer_idx"]]
                q = q + mod.linear_q_adapter_list[i](h)
                k = k + mod.linear_k_adapter_list[i](h)
                v = v + mod.linear_v_adapter_list[i](h)
            B, L, _ = h.shape
            q, k, v = (t.double().cpu().view(B, L, -1, d).transpose(1, 2) for t in (q, k, v))
            if family == "falcon_h1":
                k = k * mod.config.key_multiplier
            if use_rope:
                if family == "recurrent_gemma":
                    cos, sin = mod.rotary_emb(call["hidden"], call["position_ids"])
                else:
                    cos, sin = call["position_embeddings"]
                cos, sin = cos.double().cpu(), sin.double().cpu()
                q, k = rope(q, cos, sin), rope(k, cos, sin)
            qs.append(q)
            ks.append(k)
            vs.append(v)
    q, k, v = qs[-1], torch.cat(ks, 2), torch.cat(vs, 2)
    B, H, L, _ = q.shape
    K = k.shape[2]
    P = K - L
    n_rep = H // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)

    t = torch.arange(L)[:, None] + P
    j = torch.arange(K)[None, :]
    visible = j <= t
    if window is not None:
        visible = visible & (t - j < window)
    visible = visible[None].expand(B, L, K)
    if padding is not None:
        visible = visible & padding.cpu().bool()[:, None, :]
    scores = torch.einsum("bhtd,bhjd->bhtj", q, k) * scale_of(family, mod)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    dead = ~visible.any(-1)[:, None, :, None].expand(B, H, L, K)
    fill = 1.0 / K if implementation == "eager" else 0.0
    probs = torch.where(dead, torch.full_like(probs, fill), probs)
    return Reference(probs=probs, values=v, past=P, head_dim=d)
