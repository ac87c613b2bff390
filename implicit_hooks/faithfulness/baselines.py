"""Baseline attributions compared with the implicit-attention methods, with the same call signature.

* :class:`RandomRelevance` – seeded noise (the floor every method must beat).
* :class:`GradInput` – gradient × input at the token embeddings, summed over the embedding axis.
* :class:`IntegratedGradients` – captum's integrated gradients at the embedding layer, from a zero
  embedding baseline.
* :class:`MambaLRP` – gradient × input through a Mamba-1 forward rebuilt with MambaLRP's detach rules
  (Jafari et al., 2024): SiLU treated as linear at its slope (``u · σ(u)`` with ``σ(u)`` detached), the
  selective parameters ``Δ, B, C`` detached, the multiplicative gate ``y · SiLU(z)`` split half–half, RMS
  norm denominators detached. The rebuilt forward computes the same values as the model (tested); only
  the gradient paths change. Mamba-1 models only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..explain import _no_cache, _normalize, _position, _score
from ..families.mamba import SelectiveCore


class Baseline:
    """``attribute(inputs, *, target=None, query=-1) -> (B, L)``, like :class:`implicit_hooks.Explainer`."""

    def __init__(self, model: nn.Module, *, normalize: str = "none"):
        self.model, self.normalize = model, normalize

    def forward(self, **kwargs: Any) -> Any:
        """The model's output, without a cache (see :func:`implicit_hooks.explain._no_cache`)."""
        return self.model(**_no_cache(self.model, kwargs))

    def attribute(self, inputs: Tensor | Mapping[str, Any], *, target: Any = None, query: int = -1) -> Tensor:
        ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        q = _position(query, ids.shape[1])
        r = self._relevance(ids, target, q).detach()
        r[:, q + 1 :] = 0
        return _normalize(r, self.normalize)

    def _relevance(self, ids: Tensor, target: Any, q: int) -> Tensor:
        raise NotImplementedError


class RandomRelevance(Baseline):
    def __init__(self, model: nn.Module, *, seed: int = 0, **options: Any):
        super().__init__(model, **options)
        self.generator = torch.Generator().manual_seed(seed)

    def _relevance(self, ids, target, q):
        return torch.rand(ids.shape, generator=self.generator).to(ids.device)


def _embed(model: nn.Module, ids: Tensor) -> Tensor:
    return model.get_input_embeddings()(ids).detach().requires_grad_()


class GradInput(Baseline):
    def _relevance(self, ids, target, q):
        embeds = _embed(self.model, ids)
        score = _score(self.forward(inputs_embeds=embeds), target, q)
        (grad,) = torch.autograd.grad(score, embeds)
        return (grad * embeds).sum(-1)


class IntegratedGradients(Baseline):
    def __init__(self, model: nn.Module, *, steps: int = 16, **options: Any):
        super().__init__(model, **options)
        self.steps = steps

    def _relevance(self, ids, target, q):
        from captum.attr import IntegratedGradients as CaptumIG

        embeds = _embed(self.model, ids)
        with torch.no_grad():
            logits = self.forward(inputs_embeds=embeds).logits[:, q]
        index = logits.argmax(-1) if target is None else torch.as_tensor(target).expand(len(ids))

        def forward(x: Tensor) -> Tensor:
            return self.forward(inputs_embeds=x).logits[:, q]

        ig = CaptumIG(forward)
        attributions = ig.attribute(
            embeds, baselines=torch.zeros_like(embeds), target=index, n_steps=self.steps
        )
        return attributions.sum(-1)


def _rms_detached(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS norm with its denominator detached (values unchanged)."""
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).detach()
    return weight * (x.float() * scale).to(x.dtype)


def _half_half(a: Tensor, b: Tensor) -> Tensor:
    """``a · b`` whose gradient × input gives each factor half of the relevance."""
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)


def lrp_mixer(mixer: nn.Module, h: Tensor) -> Tensor:
    """A Mamba-1 mixer (``MambaMixer``) on ``h (B, L, D)`` with MambaLRP's detach rules; same values."""
    C = mixer.intermediate_size
    xz = mixer.in_proj(h).transpose(1, 2)  # (B, 2C, L)
    x, z = xz[:, :C], xz[:, C:]
    taps = mixer.conv1d.weight[:, 0, :]
    K = taps.shape[1]
    u = F.conv1d(F.pad(x, (K - 1, 0)), taps[:, None, :], mixer.conv1d.bias, groups=C)
    xc = u * torch.sigmoid(u).detach()  # SiLU as linear at its slope
    x_dbl = F.linear(xc.detach().transpose(1, 2), mixer.x_proj.weight)  # selective parameters: detached
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
    delta = F.softplus(mixer.dt_proj.weight @ dt.transpose(1, 2) + mixer.dt_proj.bias[None, :, None])
    A = -torch.exp(mixer.A_log.float())
    core = SelectiveCore(delta.detach(), A.detach(), Bm.detach(), Cm.detach(), mixer.D.detach())
    L = h.shape[1]
    everything = torch.arange(L, device=h.device)
    y = torch.stack(
        [
            torch.einsum(
                "ctj,cj->ct",
                core.block(b, torch.arange(C, device=h.device), everything, everything, ssm=True, skip=True),
                xc[b],
            )
            for b in range(h.shape[0])
        ]
    )
    y = _half_half(y, F.silu(z))  # the multiplicative gate, split half–half
    return mixer.out_proj(y.transpose(1, 2))


def lrp_forward(model: nn.Module, embeds: Tensor) -> Tensor:
    """Logits of a ``MambaForCausalLM`` from ``embeds`` with MambaLRP's detach rules: ``(B, L, V)``."""
    backbone = model.backbone
    h = embeds
    for layer in backbone.layers:
        normed = _rms_detached(h, layer.norm.weight, layer.norm.variance_epsilon)
        h = h + lrp_mixer(layer.mixer, normed)
    h = _rms_detached(h, backbone.norm_f.weight, backbone.norm_f.variance_epsilon)
    return model.lm_head(h)


class MambaLRP(Baseline):
    def __init__(self, model: nn.Module, **options: Any):
        super().__init__(model, **options)
        if type(model).__name__ != "MambaForCausalLM":
            raise TypeError(f"MambaLRP here supports MambaForCausalLM only, got {type(model).__name__}")

    def _relevance(self, ids, target, q):
        embeds = _embed(self.model, ids)
        logits = lrp_forward(self.model, embeds)
        score = _score(type("Output", (), {"logits": logits})(), target, q)
        (grad,) = torch.autograd.grad(score, embeds)
        return (grad * embeds).sum(-1)
