"""RWKV-7 ("Goose") time mixing of the ``rwkv`` package (``RWKV_x070``, ``RWKV_V7_ON=1``), read exactly.

The state of head ``h`` is a matrix ``S (N_value × N_key)`` updated by the generalised delta rule::

    S_t = S_{t−1} T_t + v_t k_tᵀ,    T_t = diag(w_t) − κ_t (κ_t ⊙ a_t)ᵀ,    o_t = S_t r_t

with the normalised key ``κ = normalize(k ⊙ k_k)`` per head, the in-context rate ``a``, the decay
``log w = −0.606531 · σ(w0 + tanh(x_w W1) W2)`` and the values ``v`` after the value-residual mixing
``v ← v + (v_first − v) · σ(v0 + x_v V1 V2)`` (layer 0: ``v_first = v``). The group norm ``ln_x`` is
frozen per token and head, and the bonus ``ρ_t = Σ_{i∈h} r_t[i] k_t[i] r_k[i]`` is added after it, on raw
values. Per channel ``c`` of head ``h`` (``docs/families/rwkv_pkg.md``)::

    y = G · (N · R_h + diag(ρ_h)) · v + bias
    R_h[t, j] = k_jᵀ T_{j+1} ⋯ T_t r_t        (j ≤ t)
    N[c, t]   = γ_c / σ_{t,h},   G = g = σ(x_g G1) G2,   bias = G · (N · (S_0 T_0 ⋯ T_t r_t − μ_{t,h}) + β)

``R_h`` needs products of ``N × N`` transitions. :class:`DeltaRuleCore` cuts positions into chunks of ``Q``:
inside a chunk, each row's readout is pulled back step by step (a loop over the ``Q`` offsets, all chunks at
once, every step rank one: ``T q = w ⊙ q − κ (α · q)``); between chunks, one ``N × N`` matrix per chunk
``M_K = T_{s_K} ⋯ T_{e_K}``, so a pair ``(t, j)`` in chunks ``I > J`` is ``κ'_jᵀ M_{J+1} ⋯ M_{I−1} ρ'_t``
with the key carried to its chunk's end and the readout pulled back to its chunk's start.

The compiled time mix is inlined into the compiled ``forward_seq``/``forward_one``, out of reach of any
hook. The patcher wraps those two methods of the instance: the wrapper keeps the call's tokens and a copy
of its state, then calls the compiled method unchanged (so the output is bit-identical, also on CUDA where
TorchScript fuses the whole compiled graph). When a view first needs a layer's inputs, a Python mirror of
the method replays the call, calling the compiled ``RWKV_x070_TMix_*``/``CMix_*`` layer by layer, and keeps
each time mix's arguments. The real output before the projection is obtained on demand by replaying the
compiled time mix with ``O = I``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedInputError
from ..patcher import Patcher, require
from ..recording import BlockRecord, Replacements, kept_weights
from ..view import Factors
from .rwkv_pkg import HeadCore, InstancePatch, freeze_group_norm, heads_to_channels

_F64 = torch.float64
#: the weights ``RWKV_x070_TMix_*`` takes after ``(layer_id, H, N, x, x_prev, v_first, state)``: keys of ``z``
TMIX_WEIGHTS = (
    *("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2"),
    *("g1", "g2", "k_k", "k_a", "r_k"),
    *("receptance.weight", "key.weight", "value.weight", "output.weight", "ln_x.weight", "ln_x.bias"),
)
_TMIX_ARGS = ("layer_id", "H", "N", "x", "x_prev", "v_first", "state")
#: the literal of the package's CPU path (its CUDA kernel uses exp(−0.5) through a softplus)
CPU_DECAY_SCALE = 0.606531


class DeltaRuleCore(HeadCore):
    """``N · R_h + diag(ρ_h)`` of an RWKV-7 call, for any channels, rows and columns.

    Shapes: ``receptance``/``key``/``log_decay``/``kappa``/``alpha (B, H, L, N)`` (``alpha = κ ⊙ a``),
    ``skip (B, H, L)`` (the bonus ``ρ``), ``row_scale (B, C, L)`` (``N``; set after the norm is frozen).
    Everything is float64 inside; per batch row the chunk summaries (``band (H, nC, Q, Q)``: the pairs inside
    each chunk, ``rho``/``kappa_end (H, nC, Q, N)``, ``M (H, nC, N, N)``) are computed once and kept.
    """

    # per entry, in float32 elements: the float64 head block (2) and the band offsets (2), the cast (1), the
    # channel expansion (1), its scaled copy (1) and the diagonal mask (1); row vectors: O(rows · N) per head
    work_per_entry = 8
    #: positions per chunk: loops run over the Q offsets inside a chunk and over the L / Q chunks
    default_chunk = 32

    def __init__(
        self,
        receptance: Tensor,
        key: Tensor,
        log_decay: Tensor,
        kappa: Tensor,
        alpha: Tensor,
        skip: Tensor,
        dtype: torch.dtype,
        chunk: int | None = None,
    ):
        super().__init__(receptance.shape[-1], dtype, skip.to(_F64))
        self.r, self.k = receptance.to(_F64), key.to(_F64)
        self.w = torch.exp(log_decay.to(_F64))
        self.kappa, self.alpha = kappa.to(_F64), alpha.to(_F64)
        self.chunk = chunk or self.default_chunk
        self._summaries: dict[int, dict[str, Tensor]] = {}

    def summary(self, b: int) -> dict[str, Tensor]:
        """Chunk summaries of batch row ``b`` (see the class docstring)."""
        if b in self._summaries:
            return self._summaries[b]
        Q = self.chunk
        H, L, N = self.r.shape[1:]
        nC = math.ceil(L / Q)

        def chunks(t: Tensor, fill: float) -> Tensor:  # (H, L, N) → (H, nC, Q, N); padding is T = I
            return F.pad(t, (0, 0, 0, nC * Q - L), value=fill).view(H, nC, Q, N)

        r, k, w = chunks(self.r[b], 0.0), chunks(self.k[b], 0.0), chunks(self.w[b], 1.0)
        kappa, alpha = chunks(self.kappa[b], 0.0), chunks(self.alpha[b], 0.0)
        # readouts pulled back inside their chunk:
        # band[q, d] = k_{q−d}ᵀ T_{q−d+1} ⋯ T_q r_q,  rho[q] = T_s ⋯ T_q r_q
        q = r.clone()
        band = torch.zeros(H, nC, Q, Q, dtype=_F64, device=r.device)
        for d in range(Q):  # offsets inside a chunk, every chunk at once
            pulled = q[:, :, d:]
            band[:, :, d:, d] = (k[:, :, : Q - d] * pulled).sum(-1)
            q[:, :, d:] = w[:, :, : Q - d] * pulled - kappa[:, :, : Q - d] * (
                alpha[:, :, : Q - d] * pulled
            ).sum(-1, keepdim=True)
        # keys carried to their chunk's end: kappa_end[j] = k_jᵀ T_{j+1} ⋯ T_e
        carried = k.clone()
        for d in range(1, Q):
            x = carried[:, :, : Q - d]
            carried[:, :, : Q - d] = (
                x * w[:, :, d:] - (x * kappa[:, :, d:]).sum(-1, keepdim=True) * alpha[:, :, d:]
            )
        # one transition per chunk: M = T_s ⋯ T_e
        M = torch.eye(N, dtype=_F64, device=r.device).expand(H, nC, N, N).clone()
        for d in range(Q):
            M = M * w[:, :, d, None, :] - (M @ kappa[:, :, d, :, None]) * alpha[:, :, d, None, :]
        self._summaries[b] = dict(band=band, rho=q, kappa_end=carried, M=M)
        return self._summaries[b]

    def head_block(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        s, Q = self.summary(b), self.chunk
        row_chunk, row_at = torch.div(rows, Q, rounding_mode="floor"), rows % Q
        col_chunk, col_at = torch.div(cols, Q, rounding_mode="floor"), cols % Q
        # pairs inside the row's own chunk: read off the band at offset t − j
        offset = rows[:, None] - cols[None, :]
        inside = ((row_chunk[:, None] == col_chunk[None, :]) & (offset >= 0)).to(_F64)
        hh = heads[:, None]
        band = s["band"][hh, row_chunk[None], row_at[None]]  # (nh, nr, Q)
        index = offset.clamp(0, Q - 1).expand(len(heads), -1, -1)
        out = band.gather(2, index) * inside
        # pairs across chunks: Z_J = M_{J+1} ⋯ M_{I−1} ρ'_t, then κ'_jᵀ Z_J
        last, first = int(row_chunk.max()), int(col_chunk.min())
        if first < last:
            rho = s["rho"][hh, row_chunk[None], row_at[None]]  # (nh, nr, N)
            by_chunk: dict[int, list[int]] = {}
            for i, c in enumerate(col_chunk.tolist()):
                by_chunk.setdefault(c, []).append(i)
            Z = torch.zeros_like(rho)
            for c in range(last - 1, first - 1, -1):  # chunks, not positions
                M = s["M"][:, c + 1].index_select(0, heads)  # (nh, N, N)
                Z = torch.where((row_chunk == c + 1)[None, :, None], rho, Z @ M.transpose(-1, -2))
                if c in by_chunk:
                    sel = torch.tensor(by_chunk[c], device=rows.device)
                    keys = s["kappa_end"][hh, c, col_at.index_select(0, sel)[None]]  # (nh, nsel, N)
                    out.index_add_(2, sel, Z @ keys.transpose(-1, -2))
        return out

    def mix(self, b: int, values: Tensor | None, state: Tensor | None) -> Tensor:
        """``o_t = Σ_{j≤t} R_h[t, j] v_j + S_0 T_0 ⋯ T_t r_t`` per head, ``values (H, L, N)`` → ``(H, L, N)``.

        ``state`` is ``S_0 (H, N_value, N_key)``, the package's layout. A loop over chunks.
        """
        s, Q = self.summary(b), self.chunk
        H, L, N = self.r.shape[1:]
        nC = s["M"].shape[1]
        out = torch.zeros(H, nC, Q, N, dtype=_F64, device=self.r.device)
        V = None
        if values is not None:
            V = F.pad(values.to(_F64), (0, 0, 0, nC * Q - L)).view(H, nC, Q, N)
            at = torch.arange(Q, device=self.r.device)
            offset = at[:, None] - at[None, :]  # a − b inside a chunk
            inner = s["band"].gather(-1, offset.clamp(min=0).expand(H, nC, Q, Q)) * (offset >= 0).to(_F64)
            out = inner @ V
        S = torch.zeros(H, N, N, dtype=_F64, device=self.r.device) if state is None else state.to(_F64)
        for c in range(nC):  # chunks, not positions
            out[:, c] += s["rho"][:, c] @ S.transpose(-1, -2)
            S = S @ s["M"][:, c]
            if V is not None:
                S = S + V[:, c].transpose(-1, -2) @ s["kappa_end"][:, c]
        return out.view(H, nC * Q, N)[:, :L]


class RWKV7PackagePatcher(Patcher):
    """``rwkv.model.RWKV_x070``: one patcher for the whole model, one record (``"blocks.{i}.att"``) per layer
    call."""

    kind = "rwkv7"
    holds_blocks = False
    real_output_key = "real_output"

    def block_name(self, layer: int) -> str:
        prefix = f"{self.name}." if self.name else ""
        return f"{prefix}blocks.{layer}.att"

    def _functions(self) -> dict[str, Any]:
        g = type(self.module).forward.__globals__  # the module that defined the class (a private copy too)
        fns = {k: g.get(f"RWKV_x070_{k}") for k in ("TMix_seq", "TMix_one", "CMix_seq", "CMix_one")}
        missing = [k for k, f in fns.items() if f is None]
        if missing:
            raise UnsupportedInputError(
                f"this rwkv package has no RWKV_x070_{missing[0]}: unsupported version"
            )
        if len(fns["CMix_seq"].schema.arguments) != 5:
            raise UnsupportedInputError(
                "the DeepEmbed variant of RWKV-7 (RWKV_DE_VERSION=1) is not supported; import rwkv without it"
            )
        names = [a.name for a in fns["TMix_seq"].schema.arguments]
        if tuple(names[: len(_TMIX_ARGS)]) != _TMIX_ARGS or len(names) != len(_TMIX_ARGS) + len(TMIX_WEIGHTS):
            raise UnsupportedInputError(f"RWKV_x070_TMix_seq has an unexpected signature {names}")
        fns["names"] = names
        fns["kernel"] = "RWKV7_OP" in g  # RWKV_CUDA_ON=1: the sequence path runs the CUDA kernel
        return fns

    # --- recording ----------------------------------------------------------------------------------
    def attach(self, on_record: Callable[[BlockRecord], None], *, grad: bool = False,
               replacements: Replacements | None = None) -> list:  # fmt: skip
        """Listen to the model's forwards; returns their handles. Each call's weights are looked up when its
        record opens (:meth:`open_record`), so ``replacements`` are not needed."""
        fns = self._functions()
        mirror = _MIRRORS.get(id(self.module))
        if mirror is None:
            mirror = _MIRRORS[id(self.module)] = _Mirror(self.module, fns)
        return [mirror.listen(self, on_record, grad)]

    def open_record(self, path: str, i: int, call: _Call, fns: dict, grad: bool) -> BlockRecord:
        """A record of layer ``i``'s time mix in ``call``; its inputs come from a replay when first needed."""
        record = BlockRecord(self.block_name(i), self.kind, self, grad=grad)
        fn = fns["TMix_seq"] if path == "seq" else fns["TMix_one"]
        record.raw.update(layer=i, path=path, call=call, names=fns["names"], fn=fn, kernel=fns["kernel"])
        z = self.module.z
        weights = [z[f"blocks.{i}.att.{name}"] for name in TMIX_WEIGHTS]
        weights = dict(zip(fns["names"][len(_TMIX_ARGS) :], weights))
        record.weights = kept_weights(weights, grad)
        record.weight_versions = {k: v._version for k, v in weights.items()}
        self._open.append(record)
        return record

    @staticmethod
    def args(record: BlockRecord) -> list:
        """The time mix's arguments in this call (replayed once per call, for all its layers)."""
        if "args" not in record.raw:
            require("call" in record.raw, f"{record.name}: this record holds no time-mix inputs")
            record.raw["args"] = record.raw["call"].layer_args(record.raw["layer"])
        return record.raw["args"]

    # --- the real output, by replay -------------------------------------------------------------------
    def real_output(self, record: BlockRecord) -> Tensor | None:
        """The time mix's output ``(gn(o) + ρ v) · g`` before the output projection, ``(1, C, L)``.

        Replays the compiled time mix on the recorded inputs with ``O = I`` (exact: one product by 1 per
        entry).
        """
        key = self.real_output_key
        if key not in record.raw:
            args = list(self.args(record))
            names = record.raw["names"]
            O_ = args[names.index("O_")]
            args[names.index("O_")] = torch.eye(O_.shape[0], dtype=O_.dtype, device=O_.device)
            args[6] = args[6].clone()
            with torch.no_grad():
                y = record.raw["fn"](*args)[0]
            record.raw[key] = (y if y.dim() == 2 else y[None])[None]  # (1, L, C)
        return record.raw[key].transpose(1, 2)

    # --- derivation -----------------------------------------------------------------------------------
    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Every per-call quantity (cached per dtype): ``(1, C, L)`` unless noted."""
        if dtype in record.cache:
            return record.cache[dtype]
        n = dict(zip(record.raw["names"], self.args(record)))
        layer, H, N = n["layer_id"], n["H"], n["N"]
        x = n["x"] if n["x"].dim() == 2 else n["x"][None]  # (L, C), the ln1 output
        L, C = x.shape
        # the compiled time mix up to its recurrence, in the model's dtype
        shift = torch.cat([n["x_prev"][None], x[:-1]]) - x
        xr, xw, xk, xv, xa, xg = (x + shift * n[p] for p in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r = xr @ n["R_"]
        w = torch.tanh(xw @ n["w1"]) @ n["w2"]
        k = xk @ n["K_"]
        v_own = xv @ n["V_"]
        a = torch.sigmoid(n["a0"] + (xa @ n["a1"]) @ n["a2"])
        g = torch.sigmoid(xg @ n["g1"]) @ n["g2"]
        kappa = F.normalize((k * n["k_k"]).view(L, H, N), dim=-1, p=2.0).view(L, C)
        k = k * (1 + (a - 1) * n["k_a"])
        if layer == 0:  # layer 0 ignores the v_first it is given and sets it
            v, v_first, mixing = v_own, v_own, torch.zeros_like(v_own)
        else:
            v_first = n["v_first"] if n["v_first"].dim() == 2 else n["v_first"][None]
            mixing = torch.sigmoid(n["v0"] + (xv @ n["v1"]) @ n["v2"])
            v = v_own + (v_first - v_own) * mixing
        z = (n["w0"] + w).float()
        if (
            record.raw["path"] == "seq" and record.raw["kernel"]
        ):  # the CUDA kernel: exp(−exp(−softplus(−z) − 0.5))
            log_decay = -torch.exp(-F.softplus(-z.to(_F64)) - 0.5)
        else:
            log_decay = -CPU_DECAY_SCALE * torch.sigmoid(z).to(_F64)
        bonus = (r * k * n["r_k"]).view(L, H, N).sum(-1)  # (L, H)

        def heads(t: Tensor) -> Tensor:  # (L, C) → (1, H, L, N)
            return t.reshape(L, H, N).permute(1, 0, 2)[None]

        def chans(t: Tensor) -> Tensor:  # (L, C) → (1, C, L)
            return t.transpose(0, 1)[None].to(dtype)

        core = DeltaRuleCore(
            heads(r), heads(k), heads(log_decay), heads(kappa), heads(kappa * a), bonus.T[None], dtype
        )
        state = n["state"].to(_F64)  # (H, N_value, N_key)
        mixed = core.mix(0, heads(v)[0].to(_F64), state)  # (H, L, N): o_t = S_t r_t
        mean, std = freeze_group_norm(mixed)
        gamma, beta = n["ln_w"].to(_F64), n["ln_b"].to(_F64)

        def expand(t: Tensor) -> Tensor:  # (H, L) → (1, C, L)
            return t.repeat_interleave(N, 0)[None]

        norm = gamma[None, :, None] / expand(std)
        core.row_scale = norm
        carried = heads_to_channels(core.mix(0, None, state)[None])  # (1, C, L)
        offset = norm * (carried - expand(mean)) + beta[None, :, None]
        derived = dict(
            core=core,
            values=chans(v),
            value_proj=chans(v_own),
            v_first=chans(v_first),
            value_residual=chans(mixing),
            receptance=chans(r),
            key=chans(k),
            key_norm=chans(kappa),
            in_context_rate=chans(a),
            log_decay=heads_to_channels(heads(log_decay)).to(dtype),
            gate=chans(g),
            bonus=bonus.T[None].to(dtype),
            wkv=heads_to_channels(mixed[None]).to(dtype),
            norm=norm.to(dtype),
            norm_mean=expand(mean).to(dtype),
            norm_std=expand(std).to(dtype),
            state_offset=offset.to(dtype),
            initial_state=state[None].to(dtype),
            head_size=N,
        )
        record.cache[dtype] = derived
        return derived

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        C = d["values"].shape[1]
        return Factors(
            values=d["values"],
            core=d["core"],
            left={"gate": d["gate"]},
            state_offset=d["state_offset"],
            groups={"heads": torch.arange(C, device=d["values"].device) // d["head_size"]},
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Callable[[], Tensor]]:
        def get(key: str) -> Callable[[], Tensor]:
            return lambda: self.derive(record, dtype)[key].to(dtype)

        names = (
            *("values", "value_proj", "v_first", "value_residual", "receptance", "key", "key_norm"),
            *("in_context_rate", "log_decay", "gate", "bonus", "wkv", "norm", "norm_mean", "norm_std"),
            "initial_state",
        )
        thunks = {k: get(k) for k in names}
        thunks["decay"] = lambda: torch.exp(self.derive(record, dtype)["log_decay"].to(_F64)).to(dtype)
        return thunks


_MIRRORS: dict[int, _Mirror] = {}


class _Listener:
    """The handle of one recording on a mirrored model; removing the last one restores the instance."""

    def __init__(self, mirror: _Mirror, patcher: RWKV7PackagePatcher, on_record: Callable, grad: bool):
        self.mirror, self.entry = mirror, (patcher, on_record, grad)

    def remove(self) -> None:
        self.mirror.leave(self.entry)


class _Call:
    """One call of ``forward_seq``/``forward_one``: its tokens and a copy of its initial state. The first
    view that needs a layer's time-mix inputs replays the whole call through the Python mirror."""

    def __init__(self, mirror: _Mirror, path: str, idx: Any, state: list, full_output: bool):
        self.mirror, self.path, self.full_output = mirror, path, full_output
        self.idx = list(idx) if path == "seq" else idx
        self.state = [s.clone() for s in state]  # the compiled call updates the state in place
        self.replayed: dict[int, list] | None = None

    def layer_args(self, layer: int) -> list:
        if self.replayed is None:
            self.replayed = {}
            state = [s.clone() for s in self.state]
            x = self.mirror.model.z["emb.weight"][self.idx]
            with torch.no_grad():
                self.mirror.layers(x, state, self.path, self.replayed)
        return self.replayed[layer]


class _Mirror:
    """The recording wrappers of ``RWKV_x070.forward_seq``/``forward_one`` on one model instance, shared by
    every open recording of it, and the Python mirror that replays a call layer by layer."""

    def __init__(self, model: torch.nn.Module, fns: dict[str, Any]):
        self.model, self.fns = model, fns
        self.listeners: list[tuple] = []
        self.patches: list[InstancePatch] = []

    def listen(self, patcher: RWKV7PackagePatcher, on_record: Callable, grad: bool) -> _Listener:
        if not self.listeners:
            self.patches = [
                InstancePatch(self.model, "forward_seq", self.wrap("seq", self.model.forward_seq)),
                InstancePatch(self.model, "forward_one", self.wrap("one", self.model.forward_one)),
            ]
        self.listeners.append((patcher, on_record, grad))
        return _Listener(self, patcher, on_record, grad)

    def leave(self, entry: tuple) -> None:
        if entry in self.listeners:
            self.listeners.remove(entry)
        if not self.listeners:
            for patch in self.patches:
                patch.remove()
            self.patches = []
            _MIRRORS.pop(id(self.model), None)

    def wrap(self, path: str, compiled: Callable) -> Callable:
        def recorded(idx: Any, state: list, *rest: Any, **options: Any) -> Any:
            full = bool(rest[0] if rest else options.get("full_output", False))
            call = _Call(self, path, idx, state, full)
            records = []
            for patcher, on_record, grad in list(self.listeners):
                for i in range(self.model.n_layer):
                    records.append(patcher.open_record(path, i, call, self.fns, grad))
                    on_record(records[-1])
            try:
                out = compiled(idx, state, *rest, **options)
            except BaseException:
                for record in records:
                    record.status = "failed"
                raise
            finally:
                for record in records:
                    if record in record.patcher._open:
                        record.patcher._open.remove(record)
            for record in records:
                record.status = "complete"
            return out

        return recorded

    def layers(self, x: Tensor, state: list, path: str, keep: dict[int, list]) -> Tensor:
        """A mirror of the compiled layer loop; ``keep[i]`` gets layer ``i``'s time-mix arguments."""
        model, z = self.model, self.model.z
        tmix = self.fns["TMix_seq"] if path == "seq" else self.fns["TMix_one"]
        cmix = self.fns["CMix_seq"] if path == "seq" else self.fns["CMix_one"]
        v_first = torch.empty_like(x)
        for i in range(model.n_layer):
            bbb, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
            xx = F.layer_norm(x, (model.n_embd,), weight=z[bbb + "ln1.weight"], bias=z[bbb + "ln1.bias"])
            args = [i, model.n_head, model.head_size, xx, state[i * 3 + 0], v_first, state[i * 3 + 1]]
            args += [z[att + name] for name in TMIX_WEIGHTS]
            keep[i] = args[:6] + [args[6].clone()] + args[7:]  # the CUDA kernel updates the state in place
            xx, state[i * 3 + 0], state[i * 3 + 1], v_first = tmix(*args)
            x = x + xx
            xx = F.layer_norm(x, (model.n_embd,), weight=z[bbb + "ln2.weight"], bias=z[bbb + "ln2.bias"])
            ffn_weights = (z[ffn + "x_k"], z[ffn + "key.weight"], z[ffn + "value.weight"])
            xx, state[i * 3 + 2] = cmix(xx, state[i * 3 + 2], *ffn_weights)
            x = x + xx
        return x
