"""Explanations built on recordings, with one call signature (in the spirit of captum's ``attribute``).

Every method is an object constructed from the model and its options, and answers::

    relevance = method.attribute(inputs, target=None, query=-1, **forward_kwargs)   # (batch, L)

``inputs`` are token ids ``(B, L)`` or a dict of model keyword arguments; ``query`` is the position being
explained (default: the last token; any position, e.g. a class token in the middle); ``target`` is a
logit index (int, or ``(B,)`` tensor), ``None`` for the predicted class, or a function of the model
output returning one score per batch row. Every method walks the token-mixing layers in call order
(softmax attention layers of hybrids included) through their views, channel-reduced tile by tile.

Per layer ``l`` the views give an aggregated map ``Ā_l`` (``B, L, L``), restricted to rows and columns
``≤ query`` (the matrices are causal):

* :class:`RawAttention` – ``Ā_l[query]``, averaged over layers (or one layer).
* :class:`Rollout` – Abnar & Zuidema: ``Â_l = rownorm(Ā_l + I)``; relevance ``e_q · Â_L ⋯ Â_1``.
* :class:`GradAttention` – Chefer-style ``E_c[(∇_A T ⊙ A)^+][query]`` averaged over layers; the
  gradient with respect to the attention entries is exact and needs no graph through the view:
  ``y = A·x + bias`` gives ``∂T/∂A[t, j] = ∂T/∂y[t] · x[j]`` per channel.
* :class:`Attribution` – the paper's attribution: per layer ``Ā_l`` weighted by the positive gradient of
  the target, then the rollout ``R ← R + Ā_l R`` from ``start_layer`` on. ``grad="attention"`` weighs by
  ``∇_A T`` (as above); ``grad="input_max"`` reproduces the published code's variant, the gradient at
  the block input with a max over model channels, one weight per query row.

``matrix="s6"`` explains with the S6-only matrices of Ali et al. (``view.only("ssm")``) instead of the
full ones. ``aggregate`` picks the channel reduction: ``"abs"`` (mean of ``|A|``, default), ``"mean"``
(signed) or ``"positive"`` (mean of ``A`` clamped at 0). ``normalize`` rescales each relevance vector:
``"none"``, ``"sum"`` (to unit L1 norm), ``"max"`` (to max |r| = 1) or ``"minmax"`` (to [0, 1]).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RecordingError
from .recording import BlockRecord, Recording, find_blocks, record
from .view import AttentionView

_AGGREGATES = {"abs": "abs", "mean": "signed", "positive": "positive"}
_NORMALIZE = ("none", "sum", "max", "minmax")


class Explainer:
    """Base class: runs the model under :func:`record` and turns the views into relevance ``(B, L)``."""

    needs_grad = False

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[int | str] | Callable[[str], bool] | None = None,
        matrix: str = "full",
        aggregate: str = "abs",
        normalize: str = "none",
    ):
        if matrix not in ("full", "s6"):
            raise ValueError(f"matrix must be 'full' or 's6' (S6-only, Ali et al.), got {matrix!r}")
        if aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate must be one of {sorted(_AGGREGATES)}, got {aggregate!r}")
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.model, self.layers, self.matrix = model, layers, matrix
        self.aggregate, self.normalize = aggregate, normalize

    # --- the one public call --------------------------------------------------------------------
    def attribute(
        self,
        inputs: Tensor | Mapping[str, Any],
        *,
        target: Any = None,
        query: int = -1,
        **forward_kwargs: Any,
    ) -> Tensor:
        """Relevance of every input position for the output at ``query``: ``(B, L)``."""
        kwargs = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
        kwargs.update(forward_kwargs)
        kwargs = _no_cache(self.model, kwargs)
        if self.needs_grad:
            kwargs = _embeds_as_leaf(self.model, kwargs)
        block_inputs: dict[str, Tensor] = {}
        with _capture_block_inputs(self.model, block_inputs, self.needs_grad):
            with record(self.model, layers=self.layers, grad=self.needs_grad) as rec:
                with torch.set_grad_enabled(self.needs_grad):
                    output = self.model(**kwargs)
        records = _single_forward(rec)
        L = records[0].attention.shape[-1]
        q = _position(query, L)
        score = _score(output, target, q) if self.needs_grad else None
        relevance = self._relevance(records, q, score, block_inputs)  # (B, q + 1)
        full = relevance.new_zeros(relevance.shape[0], L)
        full[:, : q + 1] = relevance.detach()
        return _normalize(full, self.normalize)

    def _relevance(self, records: list[BlockRecord], q: int, score, block_inputs) -> Tensor:
        raise NotImplementedError

    # --- shared pieces --------------------------------------------------------------------------
    def view(self, rec: BlockRecord) -> AttentionView:
        """The view this method explains with: full, or S6-only (``only("ssm")``) for recurrent blocks."""
        view = rec.attention
        return view.only("ssm") if self.matrix == "s6" and rec.kind != "attention" else view

    def layer_map(self, rec: BlockRecord, q: int, transform: str | None = None, **weights: Tensor) -> Tensor:
        """``Ā_l`` restricted to positions ``≤ q``: ``(B, q + 1, q + 1)``, channel-reduced tile by tile."""
        window = slice(0, q + 1)
        with torch.no_grad():  # the gradients needed are passed in as weights: no graph through the view
            return self.view(rec).reduce(
                "mean",
                transform=transform or _AGGREGATES[self.aggregate],
                rows=window,
                cols=window,
                **weights,
            )


class RawAttention(Explainer):
    """The aggregated matrices' row ``query``, averaged over layers, or of one layer (``layer=i``)."""

    def __init__(self, model: nn.Module, *, layer: int | None = None, **options: Any):
        super().__init__(model, **options)
        self.layer = layer

    def _relevance(self, records, q, score, block_inputs):
        chosen = records if self.layer is None else [records[self.layer]]
        return _gather([self.layer_map(r, q)[:, q] for r in chosen]).mean(0)


class Rollout(Explainer):
    """Attention rollout (Abnar & Zuidema 2020): ``Â_l = rownorm(Ā_l + I)``, ``e_q · Â_L ⋯ Â_1``."""

    def __init__(self, model: nn.Module, **options: Any):
        super().__init__(model, **options)
        if self.aggregate == "mean":
            raise ValueError("rollout multiplies row-stochastic maps: use aggregate='abs' or 'positive'")

    def _relevance(self, records, q, score, block_inputs):
        r = None
        for rec in reversed(records):  # e_q · Â_L ⋯ Â_1, one row-vector product per layer
            m = self.layer_map(rec, q)
            m = m + torch.eye(q + 1, dtype=m.dtype, device=m.device)
            m = m / m.sum(-1, keepdim=True)
            # layers may live on different devices: only the (B, q + 1) row vector moves
            r = m[:, q] if r is None else torch.einsum("bt,btj->bj", r.to(m.device), m)
        return r


def _grad_weights(records: list[BlockRecord], score: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(∂T/∂y, x)``, each ``(B, C, L)``: the gradient of the target at the block's output
    (before its output projection) and the values; ``∇_A T = ∂T/∂y ⊗ x`` channel by channel."""
    outputs = []
    for rec in records:
        key = rec.patcher.real_output_key
        if key is None or key not in rec.raw:
            raise RecordingError(
                f"{rec.name}: gradient-weighted methods need the block's real output, which was not "
                "observable on this code path (a fused kernel?)"
            )
        outputs.append(rec.raw[key])
    grads = torch.autograd.grad(score, outputs, allow_unused=True)
    pairs = []
    for rec, g in zip(records, grads):
        if g is None:
            raise RecordingError(
                f"{rec.name}: the target does not depend on this block's recorded output (not recorded "
                "inside the autograd graph), so its gradient-weighted map cannot be computed"
            )
        g = g[:, None, :] if g.dim() == 2 else g  # a (B, C) single-token output
        with torch.no_grad():
            pairs.append((g.transpose(1, 2).detach(), rec.attention.values.detach()))
    return pairs


class GradAttention(Explainer):
    """Chefer-style gradient ⊙ attention: ``E_c[(∇_A T ⊙ A)^+][query]`` averaged over layers."""

    needs_grad = True

    def _relevance(self, records, q, score, block_inputs):
        maps = []
        for rec, (g, x) in zip(records, _grad_weights(records, score)):
            maps.append(self.layer_map(rec, q, transform="positive", row_weight=g, col_weight=x)[:, q])
        return _gather(maps).mean(0)


class Attribution(Explainer):
    """The paper's attribution: gradient-weighted maps, then rollout ``R ← R + Ā_l R``.

    Options (the variants of the published code): ``grad="attention"`` (``∇_A T``, default) or
    ``"input_max"`` (gradient at the block input, max over model channels, one weight per row);
    ``layer_normalize="minmax"`` rescales each ``Ā_l`` to [0, 1] first; ``start_layer`` skips the
    layers before it.
    """

    needs_grad = True

    def __init__(
        self,
        model: nn.Module,
        *,
        grad: str = "attention",
        layer_normalize: str = "none",
        start_layer: int = 0,
        **options: Any,
    ):
        super().__init__(model, **options)
        if grad not in ("attention", "input_max"):
            raise ValueError(f"grad must be 'attention' or 'input_max', got {grad!r}")
        if layer_normalize not in ("none", "minmax"):
            raise ValueError(f"layer_normalize must be 'none' or 'minmax', got {layer_normalize!r}")
        self.grad, self.layer_normalize, self.start_layer = grad, layer_normalize, start_layer

    def _maps(self, records, q, score, block_inputs) -> list[Tensor]:
        if self.grad == "attention":
            pairs = _grad_weights(records, score)
            return [
                self.layer_map(rec, q, transform="positive", row_weight=g, col_weight=x)
                for rec, (g, x) in zip(records, pairs)
            ]
        missing = [r.name for r in records if r.name not in block_inputs]
        if missing:
            raise RecordingError(f"no block input was captured for {missing}")
        inputs = [block_inputs[r.name] for r in records]
        grads = torch.autograd.grad(score, inputs, allow_unused=True)
        maps = []
        for rec, g, h in zip(records, grads, inputs):
            g = torch.zeros_like(h) if g is None else g
            weight = g.detach().amax(-1)[:, : q + 1]  # (B, q + 1): max over model channels
            maps.append((self.layer_map(rec, q) * weight[:, :, None]).clamp_min(0))
        return maps

    def _relevance(self, records, q, score, block_inputs):
        maps = self._maps(records, q, score, block_inputs)[self.start_layer :]
        if self.layer_normalize == "minmax":
            maps = [_normalize(m.flatten(1), "minmax").view_as(m) for m in maps]
        r = torch.zeros(maps[0].shape[0], q + 1, dtype=maps[0].dtype, device=maps[-1].device)
        r[:, q] = 1
        for m in reversed(maps):  # e_q · (I + Ā_L) ⋯ (I + Ā_s)
            r = r.to(m.device)  # only the (B, q + 1) row vector moves between devices
            r = r + torch.einsum("bt,btj->bj", r, m)
        return r


METHODS: dict[str, type[Explainer]] = {
    "raw": RawAttention,
    "rollout": Rollout,
    "attribution": Attribution,
    "grad_attention": GradAttention,
}


# --- helpers ------------------------------------------------------------------------------------
def _gather(rows: list[Tensor]) -> Tensor:
    """Stack per-layer ``(B, L)`` results on the last layer's device (a model may be sharded)."""
    return torch.stack([r.to(rows[-1].device) for r in rows])


def _single_forward(rec: Recording) -> list[BlockRecord]:
    names = rec.names()
    if not names:
        raise RecordingError("the forward called no supported block")
    if len(set(names)) != len(names):
        raise RecordingError("explanations need one forward: a block was called more than once (generation?)")
    return list(rec)


def _position(query: int, L: int) -> int:
    if not -L <= query < L:
        raise IndexError(f"query position {query} is out of range for length {L}")
    return query % L


def _score(output: Any, target: Any, q: int) -> Tensor:
    """One scalar: the sum over the batch of the target score at position ``q``."""
    if callable(target):
        score = target(output)
        return score.sum()
    logits = output.logits if hasattr(output, "logits") else output
    logits = logits[:, q] if logits.dim() == 3 else logits  # (B, V): token-level or pooled
    if target is None:
        index = logits.argmax(-1)
    else:
        index = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
    return logits.gather(1, index[:, None]).sum()


def _normalize(r: Tensor, how: str) -> Tensor:
    if how == "none":
        return r
    if how == "sum":
        return r / r.abs().sum(-1, keepdim=True).clamp_min(1e-30)
    if how == "max":
        return r / r.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    low, high = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    return (r - low) / (high - low).clamp_min(1e-30)


def _no_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One forward needs no cache, and some models (RWKV) write their cached state in place, which
    breaks backpropagation: ask for none unless the caller did."""
    if "use_cache" not in kwargs and "use_cache" in inspect.signature(type(model).forward).parameters:
        kwargs = {**kwargs, "use_cache": False}
    return kwargs


def _embeds_as_leaf(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Feed embeddings as a leaf that requires grad, so gradients exist even for frozen weights."""
    if "input_ids" in kwargs and hasattr(model, "get_input_embeddings"):
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids")
        kwargs["inputs_embeds"] = model.get_input_embeddings()(ids).detach().requires_grad_()
    return kwargs


class _capture_block_inputs:
    """Our own pre-hooks on the supported blocks: their input hidden states (for ``grad="input_max"``)."""

    def __init__(self, model: nn.Module, sink: dict[str, Tensor], active: bool):
        self.blocks = find_blocks(model) if active else []
        self.sink, self.handles = sink, []

    def __enter__(self):
        for name, module, _ in self.blocks:

            def pre(mod, args, kwargs, name=name):
                hidden = args[0] if args else kwargs.get("hidden_states")
                if isinstance(hidden, Tensor):
                    self.sink[name] = hidden

            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False
