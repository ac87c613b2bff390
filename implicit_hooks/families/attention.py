"""Softmax attention layers of Griffin and the hybrids, in the same interface as the recurrent blocks.

Per batch row ``b``, query head ``h`` and channel ``c = h · d + i`` (``d`` the head size)::

    y[c] = A[h] · v[c] + bias[c]
    A[h][t, j] = softmax_j(scale · q_t · k_j + mask[t, j])        (keys of this call, j ≤ t)
    bias[c, t] = Σ_{j in cache} A_full[h][t, j] · v_cache[j, i]  +  Σ_{j > t} A_full[h][t, j] · v[j, i]

``q`` and ``k`` are the post-RoPE queries and keys (FalconH1: keys times ``key_multiplier``; Zamba2:
projections plus the call's LoRA adapter), ``v`` the values of the query head's key/value head (grouped
query attention repeats them), ``A_full`` the probabilities over every key the call attends to: the
cached keys of earlier calls first, then this call's. Its normaliser is the logsumexp of the whole row,
so the part of ``A_full`` on this call's causal columns is the matrix, and what rows spend elsewhere
(on cached keys, or on later positions where the model lets a fully masked padding row attend to
everything) goes to ``bias``. The factor form is ``y = core · x + bias`` with ``core = A`` (component
``"ssm"`` of the view, the only one), channels = query heads × head size, ``groups["heads"]``.

Only sub-module outputs are tapped (``q_proj``, ``k_proj``, ``v_proj``, adapters, ``rotary_emb``, the
input of ``o_proj``) plus the module's own keyword arguments (``position_embeddings``,
``attention_mask``, the cache's keys before the call): nothing forces ``output_attentions`` and no
forward is replaced. RoPE is re-applied at view time with the model file's own ``apply_rotary_pos_emb``
in the model's dtype, so the keys and queries are the ones the kernel saw.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import RecordingError, UnsupportedInputError
from ..patcher import Patcher, require
from ..recording import BlockRecord
from ..view import DEFAULT_TILE_ELEMENTS, Core, Factors

#: attention implementations whose masking semantics are reproduced exactly.
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


class SoftmaxCore(Core):
    """The softmax probabilities of one attention call, any block of rows and columns, computed lazily.

    Shapes: ``queries (B, H, L, d)``, ``keys (B, H_kv, L_k, d)`` with the ``P = L_k − L`` cached keys
    first, ``mask`` a ``(B | 1, H | 1, L, L_k)`` tensor (bool: True attends; float: additive) or None
    (then ``causal`` says whether key ``P + j`` is hidden from query ``t`` for ``j > t``). Channel ``c``
    reads head ``c // head_size``. A row's normaliser is its logsumexp over all allowed keys; a row whose
    every key is masked is ``1 / L_k`` everywhere (``dead_rows="uniform"``: additive masks, where the
    mask absorbs the logits) or zero (``"zero"``: boolean masks in torch's SDPA).
    ``block`` returns this call's columns with ``j ≤ t`` only; the rest of each row is in ``bias``.
    """

    work_per_entry = 3

    def __init__(
        self,
        queries: Tensor,
        keys: Tensor,
        *,
        scale: float,
        head_size: int,
        mask: Tensor | None,
        causal: bool,
        dead_rows: str,
        tile_elements: int = DEFAULT_TILE_ELEMENTS,
    ):
        self.queries, self.keys, self.scale = queries, keys, scale
        self.head_size = head_size
        self.n_rep = queries.shape[1] // keys.shape[1]
        self.mask, self.causal, self.dead_rows = mask, causal, dead_rows
        self.offset = keys.shape[2] - queries.shape[2]  # P: cached keys come first
        self.tile_elements = tile_elements

    @property
    def dtype(self) -> torch.dtype:
        return self.queries.dtype

    def allowed(self, b: int, heads: Tensor, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(allowed (nh | 1, nr, L_k) bool, additive (nh | 1, nr, L_k) or None)`` for query ``rows``."""
        L_k = self.keys.shape[2]
        if self.mask is None:
            keys = torch.arange(L_k, device=rows.device)
            if self.causal:
                return (keys[None, None, :] <= (self.offset + rows)[None, :, None]), None
            return torch.ones(1, len(rows), L_k, dtype=torch.bool, device=rows.device), None
        m = self.mask[b if self.mask.shape[0] > 1 else 0]  # (H | 1, L, L_k)
        m = m.index_select(0, heads) if m.shape[0] > 1 else m
        m = m.index_select(1, rows)
        if m.dtype == torch.bool:
            return m, None
        # An additive mask hides a key with the dtype's minimum (or -inf): those entries get exactly 0.
        allowed = m > torch.finfo(m.dtype).min / 2
        return allowed, torch.where(allowed, m, torch.zeros((), dtype=m.dtype, device=m.device)).to(
            self.dtype
        )

    def probs(self, b: int, heads: Tensor, rows: Tensor) -> Tensor:
        """Full rows ``A_full[b, heads, rows, :]`` over every attended key: ``(nh, nr, L_k)``."""
        q = self.queries[b].index_select(0, heads).index_select(1, rows)  # (nh, nr, d)
        k = self.keys[b].index_select(0, torch.div(heads, self.n_rep, rounding_mode="floor"))  # (nh, L_k, d)
        logits = torch.einsum("hrd,hjd->hrj", q, k) * self.scale
        allowed, additive = self.allowed(b, heads, rows)
        if additive is not None:
            logits = logits + additive
        dead = ~allowed.any(-1, keepdim=True)  # rows with no visible key: their fill is set below
        logits = logits.masked_fill(~allowed, float("-inf")).masked_fill(dead, 0.0)
        probs = torch.softmax(logits, dim=-1)  # each row normalised by its logsumexp over allowed keys
        fill = 1.0 / logits.shape[-1] if self.dead_rows == "uniform" else 0.0
        return probs.masked_fill(dead, fill)

    def _row_chunk(self, n_heads: int) -> int:
        """Rows per chunk so that full-width logits of ``n_heads`` heads stay within a tile."""
        return max(1, self.tile_elements // max(1, n_heads * self.keys.shape[2]))

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        out = torch.zeros(len(chans), len(rows), len(cols), dtype=self.dtype, device=self.queries.device)
        if not ssm:
            return out
        heads, which = torch.unique(
            torch.div(chans, self.head_size, rounding_mode="floor"), return_inverse=True
        )
        causal = (cols[None, :] <= rows[:, None]).to(self.dtype)  # (nr, ncol)
        step = self._row_chunk(len(heads))
        for r0 in range(0, len(rows), step):  # row chunks bound the full-width logits, not a loop over L
            part = self.probs(b, heads, rows[r0 : r0 + step]).index_select(2, self.offset + cols)
            out[:, r0 : r0 + step] = part.index_select(0, which) * causal[None, r0 : r0 + step]
        return out

    def outside(self, values_all: Tensor) -> Tensor | None:
        """``Σ_j A_full[t, j] v[j]`` over the keys the matrix leaves out (cached, ``j > t``): ``(B, H·d, L)``.

        ``values_all``: ``(B, H_kv, L_k, d)``. None when no row has such a key.
        """
        B, H, L, _ = self.queries.shape
        device = self.queries.device
        positions = torch.arange(L, device=device)
        rows = positions if self.offset > 0 else self._rows_reaching_ahead()
        if rows is None or len(rows) == 0:
            return None
        heads = torch.arange(H, device=device)
        values = values_all.repeat_interleave(self.n_rep, dim=1).to(self.dtype)  # (B, H, L_k, d)
        d = values.shape[-1]
        out = torch.zeros(B, H, L, d, dtype=self.dtype, device=device)
        keys = torch.arange(values.shape[2], device=device)
        step = self._row_chunk(H)
        for b in range(B):
            for r0 in range(0, len(rows), step):
                chunk = rows[r0 : r0 + step]
                inside = (keys[None, :] >= self.offset) & (keys[None, :] - self.offset <= chunk[:, None])
                weight = self.probs(b, heads, chunk) * (~inside).to(self.dtype)[None]
                out[b].index_copy_(1, chunk, torch.einsum("hrj,hjd->hrd", weight, values[b]))
        return out.transpose(2, 3).reshape(B, H * d, L)

    def _rows_reaching_ahead(self) -> Tensor | None:
        """Query rows (no cache) whose mask lets them see a later position, or that are fully masked."""
        L = self.queries.shape[2]
        device = self.queries.device
        if self.mask is None:
            return None if self.causal or L == 1 else torch.arange(L, device=device)
        allowed = (
            self.mask > torch.finfo(self.mask.dtype).min / 2 if self.mask.is_floating_point() else self.mask
        )
        ahead = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
        reaching = (allowed & ahead).flatten(0, 1).any(0).any(-1)  # (L,)
        if self.dead_rows == "uniform":
            reaching = reaching | (~allowed.any(-1)).flatten(0, 1).any(0)
        return reaching.nonzero().flatten()  # a host read, at view time only


def _rope_function(module: torch.nn.Module) -> Callable:
    """The ``apply_rotary_pos_emb`` of the model file that defines ``module``'s class (or a base class)."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
        if fn is not None:
            return fn
    raise RecordingError(f"{type(module).__name__}: no apply_rotary_pos_emb in its model file")


class SoftmaxAttentionPatcher(Patcher):
    """transformers' softmax attention modules of the hybrids (``JambaAttention``, ``BambaAttention`` …).

    Taps the outputs of ``q_proj``, ``k_proj``, ``v_proj`` and the input of ``o_proj``; reads
    ``position_embeddings``, ``attention_mask`` and the cache from the call's arguments.
    """

    kind = "attention"
    holds_blocks = False
    real_output_key = "o_proj_input"

    tap_paths = {
        "q_proj": ("q_proj", "output"),
        "k_proj": ("k_proj", "output"),
        "v_proj": ("v_proj", "output"),
        "o_proj_input": ("o_proj", "input"),
    }

    def on_call(self, record: BlockRecord, args: tuple, kwargs: dict) -> None:
        m = self.module
        raw = record.raw
        raw["attention_mask"] = self.argument("attention_mask", args, kwargs)
        raw["position_embeddings"] = self.argument("position_embeddings", args, kwargs)
        raw["is_causal"] = kwargs.get("is_causal", getattr(m, "is_causal", True))
        raw["implementation"] = getattr(m.config, "_attn_implementation", None)
        raw["dropout"] = m.training and getattr(m, "attention_dropout", 0.0) > 0
        raw["scale"] = m.scaling
        layer_idx = self.argument("layer_idx", args, kwargs, getattr(m, "layer_idx", None))
        raw["layer_idx"] = layer_idx
        cache = self.argument("cache", args, kwargs)
        if cache is None:  # transformers 5.1x calls it past_key_values
            cache = self.argument("past_key_values", args, kwargs)
        raw["cache"] = _cached_keys(cache, layer_idx)

    # --- derivation -----------------------------------------------------------------------------
    def projections(self, record: BlockRecord) -> tuple[Tensor, Tensor, Tensor]:
        """The call's ``q, k, v`` as ``(B, L, H·d)`` in the model's dtype, before RoPE."""
        for key in ("q_proj", "k_proj", "v_proj"):
            require(key in record.raw, f"{record.name}: {key} never ran as a module during this call")
        return record.raw["q_proj"], record.raw["k_proj"], record.raw["v_proj"]

    def rope(self, record: BlockRecord) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` the call rotated its queries and keys with, or None (no RoPE)."""
        return record.raw.get("position_embeddings")

    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Queries, keys, values and mask of the call in ``dtype`` (cached per dtype)."""
        if dtype in record.cache:
            return record.cache[dtype]
        raw, m = record.raw, self.module
        impl = raw["implementation"]
        require(
            impl in SUPPORTED_IMPLEMENTATIONS,
            f"{record.name}: attention implementation {impl!r} is not supported (its masking differs); "
            f"load the model with attn_implementation in {SUPPORTED_IMPLEMENTATIONS}",
        )
        require(
            not raw["dropout"], f"{record.name}: attention dropout was active (training mode); call .eval()"
        )
        q, k, v = self.projections(record)
        B, L, _ = q.shape
        d = m.head_dim
        # The module's own reshapes, in the model's dtype: (B, L, H·d) -> (B, H, L, d).
        q, k, v = (t.view(B, L, -1, d).transpose(1, 2) for t in (q, k, v))
        k = self.scale_keys(k)
        cos_sin = self.rope(record)
        if cos_sin is not None:
            q, k = _rope_function(m)(q, k, *cos_sin)

        cached = raw["cache"]
        v_all = v
        if cached is not None:
            past_k, past_v = cached.read(record.name)
            k = torch.cat([past_k.to(k.device), k], dim=2)
            v_all = torch.cat([past_v.to(v.device), v], dim=2)
            if cached.window is not None:  # a sliding layer that records its past returns only the window
                k, v_all = k[:, :, -(cached.window - 1 + L) :], v_all[:, :, -(cached.window - 1 + L) :]

        mask = raw["attention_mask"]
        if mask is not None:
            require(
                isinstance(mask, Tensor) and mask.dim() == 4,
                f"{record.name}: attention_mask must be a 4-D tensor for {impl!r} attention, "
                f"got {type(mask).__name__}",
            )
            Bm, Hm, Lq, Lk = mask.shape
            require(
                Bm in (1, B) and Hm in (1, q.shape[1]) and Lq == L and Lk >= L,
                f"{record.name}: attention_mask of shape {tuple(mask.shape)} does not match the call "
                f"(batch {B}, heads {q.shape[1]}, {L} queries)",
            )
            require(
                Lk <= k.shape[2],
                f"{record.name}: the mask covers {Lk} keys, but the call brought {L} and its cache held "
                f"{k.shape[2] - L}: a static (preallocated) cache is not supported; use a DynamicCache",
            )
            require(
                impl == "sdpa" or mask.is_floating_point(),
                f"{record.name}: eager attention adds its mask, so a boolean mask would be added as 0/1; "
                "pass a float mask",
            )
            k, v_all = k[:, :, -Lk:], v_all[:, :, -Lk:]  # the mask says how many keys the call attended to
        causal = impl == "sdpa" and bool(raw["is_causal"]) and L > 1
        require(
            mask is not None or not causal or k.shape[2] == L,
            f"{record.name}: SDPA ran causally without a mask over {k.shape[2]} keys for {L} queries "
            "(a static cache?); not supported",
        )
        dead_rows = "zero" if mask is not None and mask.dtype == torch.bool else "uniform"
        core = SoftmaxCore(
            q.to(dtype),
            k.to(dtype),
            scale=float(raw["scale"]),
            head_size=d,
            mask=mask,
            causal=causal,
            dead_rows=dead_rows,
        )
        H = q.shape[1]
        n_rep = H // v.shape[1]
        values = v.repeat_interleave(n_rep, dim=1).to(dtype)  # (B, H, L, d): each query head's values
        derived = dict(
            queries=core.queries,
            keys=core.keys,
            values=values.transpose(2, 3).reshape(B, H * d, L),
            values_all=v_all.to(dtype),
            core=core,
            heads=torch.arange(H * d, device=q.device) // d,
            kv_heads=torch.arange(H * d, device=q.device) // (d * n_rep),
        )
        record.cache[dtype] = derived
        return derived

    def scale_keys(self, k: Tensor) -> Tensor:
        """Keys as the module scales them before RoPE (FalconH1's ``key_multiplier``)."""
        return k

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        return Factors(
            values=d["values"],
            core=d["core"],
            state_offset=d["core"].outside(d["values_all"]),
            groups={"heads": d["heads"], "kv_heads": d["kv_heads"]},
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype):
        def get(key: str):
            return lambda: self.derive(record, dtype)[key]

        def probs() -> Tensor:  # (B, H, L, L_k): every attended key, cached ones first
            core = self.derive(record, dtype)["core"]
            B, H, L, _ = core.queries.shape
            heads, rows = (torch.arange(n, device=core.queries.device) for n in (H, L))
            return torch.stack([core.probs(b, heads, rows) for b in range(B)])

        return {
            "queries": get("queries"),
            "keys": get("keys"),
            "values": get("values"),
            "values_all": get("values_all"),
            "probs": probs,
        }


#: cache layers whose ``update`` only appends (full) or keeps the last ``window − 1`` tokens (sliding).
_APPEND_ONLY = "DynamicLayer.update"
_SLIDING = "DynamicSlidingWindowLayer.update"


@dataclass
class CachedKeys:
    """The keys and values one call attends to from earlier calls, as a transformers cache layer held them.

    A full dynamic layer only appends, so its first ``length`` tokens stay what this call saw: the record
    keeps the layer and a copy of the newest cached key and value (to notice a cache cropped or reset since)
    instead of the tensors, which would keep every step's cache alive during generation. A sliding layer
    holds at most ``window − 1`` tokens and drops old ones: the record keeps references to them.
    """

    layer: Any
    length: int
    keys: Tensor | None = None  # sliding layers: the tensors themselves
    values: Tensor | None = None
    versions: tuple[int, int] | None = None
    newest: tuple[Tensor, Tensor] | None = None  # full layers: copies of the last cached key and value
    window: int | None = None  # sliding layers that record their past return only the window
    unsupported: str | None = None

    def read(self, name: str) -> tuple[Tensor, Tensor]:
        """``(keys, values)``, ``(B, H_kv, length, d)``; raises if they cannot be those of the call."""
        if self.unsupported is not None:
            raise UnsupportedInputError(
                f"{name}: the call continued from a {self.unsupported} cache layer, whose keys this view "
                "cannot read back; use a DynamicCache (the default)"
            )
        if self.keys is not None:
            if (self.keys._version, self.values._version) != self.versions:
                raise RecordingError(f"{name}: the cached keys of this call were changed in place since")
            return self.keys, self.values
        keys, values = getattr(self.layer, "keys", None), getattr(self.layer, "values", None)
        fresh = isinstance(keys, Tensor) and keys.dim() == 4 and keys.shape[2] >= self.length
        if fresh:
            keys, values = keys[:, :, : self.length], values[:, :, : self.length]
            newest_k, newest_v = self.newest
            fresh = torch.equal(keys[:, :, -1:].to(newest_k.device), newest_k) and torch.equal(
                values[:, :, -1:].to(newest_v.device), newest_v
            )
        if not fresh:
            raise RecordingError(
                f"{name}: the cache this call continued from was cropped, reset or reordered since, so the "
                "keys it attended to are gone; read the view before changing the cache"
            )
        return keys, values


def _cached_keys(cache: Any, layer_idx: int | None) -> CachedKeys | None:
    """What a call will attend to from earlier calls (read *before* the call; shapes and attributes only)."""
    if cache is None or layer_idx is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, Tensor) or keys.dim() != 4 or keys.shape[2] == 0:
        return None
    length = keys.shape[2]
    update = getattr(type(layer).update, "__qualname__", "")
    if update == _SLIDING:
        window = layer.sliding_window if getattr(layer, "record_past", False) else None
        versions = (keys._version, values._version)
        return CachedKeys(layer, length, keys=keys, values=values, versions=versions, window=window)
    if update == _APPEND_ONLY:
        # copies of one token (no host synchronisation): the fingerprint of what this call attends to
        return CachedKeys(layer, length, newest=(keys[:, :, -1:].clone(), values[:, :, -1:].clone()))
    return CachedKeys(layer, length, unsupported=type(layer).__name__)


class RecurrentGemmaAttentionPatcher(SoftmaxAttentionPatcher):
    """``RecurrentGemmaAttention``: local attention over a sliding window; RoPE (partial) inside."""

    tap_paths = {**SoftmaxAttentionPatcher.tap_paths, "rotary": ("rotary_emb", "output")}

    def rope(self, record: BlockRecord):
        require("rotary" in record.raw, f"{record.name}: rotary_emb never ran as a module during this call")
        return record.raw["rotary"]


class FalconH1AttentionPatcher(SoftmaxAttentionPatcher):
    """``FalconH1Attention``: keys times ``key_multiplier`` before RoPE."""

    def scale_keys(self, k: Tensor) -> Tensor:
        return k * self.module.key_multiplier


class Zamba2AttentionPatcher(SoftmaxAttentionPatcher):
    """``Zamba2Attention``: shared across layers; per-layer LoRA adapters add to q, k, v; RoPE optional."""

    def taps(self):
        taps = super().taps()
        m = self.module
        if m.config.use_shared_attention_adapter:
            for part in "qkv":
                for i, adapter in enumerate(getattr(m, f"linear_{part}_adapter_list")):
                    taps[f"{part}_adapter.{i}"] = (adapter, "output")
        return taps

    def projections(self, record: BlockRecord):
        q, k, v = super().projections(record)
        m = self.module
        if not m.config.use_shared_attention_adapter:
            return q, k, v
        i = m.layer_dic[record.raw["layer_idx"]]
        adapted = []
        for part, t in zip("qkv", (q, k, v)):
            key = f"{part}_adapter.{i}"
            require(key in record.raw, f"{record.name}: the {part} adapter {i} never ran during this call")
            adapted.append(t + record.raw[key])  # the module's own sum, in the model's dtype
        return tuple(adapted)

    def rope(self, record: BlockRecord):
        return record.raw.get("position_embeddings") if self.module.config.use_mem_rope else None
