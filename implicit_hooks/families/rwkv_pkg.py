"""RWKV-4, 5, 5.1, 5.2 and 6 time mixing of the ``rwkv`` package (``rwkv.model.RWKV``), read exactly.

Channels ``c = h·N + n`` (head ``h``, head size ``N``); ``r``, ``k``, ``v`` come after the token shift, so
they are plain projections of the shifted inputs. Per channel (``docs/families/rwkv_pkg.md``)::

    v5, v5.1, v5.2, v6:   y = G · N · (R_h + diag(D_h)) · v + bias
        R_h[t, j] = Σ_i r_t[i] · exp(S_{t−1}[i] − S_j[i]) · k_j[i]     (j < t),   S_t = Σ_{m ≤ t} log w_m
        D_h[t]    = Σ_i r_t[i] · u[i] · k_t[i]                            the bonus ("skip")
        N[c, t]   = γ_c / σ_{t,h}                                          ``ln_x`` frozen per token
        G         = SiLU(g)                                                (v5.1, v5.2, v6; v5 has no gate)
        bias      = G · N · (state_t − μ_{t,h} + β_c · σ_{t,h} / γ_c)
    v4:                   y = σ(r) · WKV · v + bias                        (the normalised WKV of rwkv4.py)

``w`` is one decay per head in v5 and v5.1, per channel in v5.2 and per channel and token in v6
(``log w = −exp(t_decay + tanh(x_w W1) W2)``); every decay stays in log space (segment sums ``segsum``
in float64). The group norm subtracts the head mean ``μ_{t,h}`` of the mixed output; frozen per token it
goes to ``bias`` together with ``ln_x.bias`` (``β``) and a carried state, while its scale ``γ/σ`` is the
``"norm"`` factor.

The package's model is a TorchScript module without sub-modules, so module hooks do not exist: the patcher
replaces, on the instance only and restored on exit, the per-layer time-mix methods that ``forward`` looks up
(``att_seq*``, ``att_one*``, ``cuda_att_seq*``). The wrapper calls the original unchanged and keeps references
to its inputs; layers are told apart by the identity of their ``ln1.weight``. The real output before the
output projection is never materialised by the model: :meth:`RWKVPackagePatcher.real_output` replays the
compiled time mix on the recorded inputs with the output weight replaced by ``2^s · I``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedInputError
from ..patcher import Patcher, require
from ..recording import BlockRecord, Replacements
from ..view import Core, Factors
from .rwkv4 import WKVCore, log_normaliser

_F64 = torch.float64
#: the group norm epsilon of every RWKV-5/6/7 time mix (``F.group_norm(..., eps=64e-5)``).
GROUP_NORM_EPS = 64e-5
_QUANT = ("mx", "rx", "my", "ry")


# --- the package itself ----------------------------------------------------------------------------
_MODULES: dict[tuple[bool, bool], ModuleType] = {}


def _fits(module: ModuleType, v7: bool, jit: bool) -> bool:
    if v7:
        return hasattr(module, "RWKV_x070")
    if getattr(module, "RWKV", None) is getattr(module, "RWKV_x070", object()):
        return False  # RWKV_V7_ON=1 rebinds RWKV to RWKV_x070: the v4–v6 class is out of reach
    return issubclass(module.RWKV, torch.jit.ScriptModule) == jit


def rwkv_module(*, v7: bool = False, jit: bool = True) -> ModuleType:
    """The ``rwkv.model`` module that builds v4–v6 models (``v7=False``) or ``RWKV_x070``.

    The package chooses at import time (``RWKV_V7_ON``, ``RWKV_JIT_ON``); a process that needs another
    flavour than the imported one gets a private copy of ``rwkv/model.py`` executed under those settings
    (``sys.modules``, the environment and the TF32/cuDNN switches the package flips on import are left as
    they were). v7 is always TorchScript.
    """
    jit = True if v7 else jit
    if (v7, jit) in _MODULES:
        return _MODULES[(v7, jit)]
    module = sys.modules.get("rwkv.model")
    wanted_env = {"RWKV_V7_ON": "1" if v7 else "0", "RWKV_JIT_ON": "1" if jit else "0"}
    if module is None:
        env_v7 = os.environ.get("RWKV_V7_ON") == "1"
        env_jit = os.environ.get("RWKV_JIT_ON") != "0"
        if env_v7 == v7 and (v7 or env_jit == jit):
            module = importlib.import_module("rwkv.model")
    if module is None or not _fits(module, v7, jit):
        spec = importlib.util.find_spec("rwkv.model")
        if spec is None or spec.origin is None:
            raise ImportError("the rwkv package is not installed: pip install rwkv")
        saved = {key: os.environ.get(key) for key in wanted_env}
        switches = _backend_switches()
        os.environ.update(wanted_env)
        try:
            private = importlib.util.spec_from_file_location("rwkv.model", spec.origin)
            module = importlib.util.module_from_spec(private)
            private.loader.exec_module(module)  # type: ignore[union-attr]
        finally:
            _backend_switches(switches)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            os.environ.setdefault("RWKV_CUDA_ON", "0")  # read by the package at run time
    _MODULES[(v7, jit)] = module
    return module


def _backend_switches(restore: dict[str, bool] | None = None) -> dict[str, bool]:
    """torch's TF32 and cuDNN benchmark switches (which ``rwkv/model.py`` turns on when executed), or
    set them back to ``restore``."""
    places = {
        "matmul.allow_tf32": torch.backends.cuda.matmul,
        "cudnn.allow_tf32": torch.backends.cudnn,
        "cudnn.benchmark": torch.backends.cudnn,
    }
    if restore is not None:
        for key, value in restore.items():
            setattr(places[key], key.split(".")[1], value)
    return {key: getattr(obj, key.split(".")[1]) for key, obj in places.items()}


def checkpoint_version(path: str | os.PathLike) -> float:
    """The RWKV version of a checkpoint in the package's format, inferred from its keys like the package."""
    weights = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    keys = list(weights)
    if "blocks.0.att.r_k" in weights:
        return 7.0
    if any("time_maa" in k for k in keys):
        return 6.0
    if not any("ln_x" in k for k in keys):
        return 4.0
    if not any("gate.weight" in k for k in keys):
        return 5.0
    decay = weights.get("blocks.0.att.time_decay")
    return 5.2 if decay is not None and decay.dim() > 1 and decay.shape[1] > 1 else 5.1


def load_checkpoint(
    path: str | os.PathLike, strategy: str = "cpu fp32", *, jit: bool = True
) -> torch.nn.Module:
    """Build the ``rwkv`` package's model from a checkpoint file of any version (v4 … v7).

    Example::

        model = load_checkpoint("RWKV-x060-World-1B6.pth", "cuda fp16")
        with implicit_hooks.record(model) as rec:
            logits, state = model.forward(token_ids, None)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint file")
    if checkpoint_version(path) == 7.0:
        words = strategy.split()
        if len(words) != 2:
            raise UnsupportedInputError(f"RWKV-7 strategies are 'cpu|cuda fp32|fp16|bf16', got {strategy!r}")
        stem = str(path)[: -len(".pth")] if str(path).endswith(".pth") else str(path)
        return rwkv_module(v7=True).RWKV_x070(stem, strategy)
    return rwkv_module(jit=jit).RWKV(str(path), strategy, verbose=False)


class RwkvLM(torch.nn.Module):
    """A causal-LM face for the ``rwkv`` package's model: ``forward(input_ids)`` → an object with
    ``.logits (B, L, V)``, one package call per batch row, so explanations and reports can run on it.

    Example::

        lm = RwkvLM(load_checkpoint("model.pth"))
        relevance = implicit_hooks.Rollout(lm).attribute(torch.tensor([[5, 17, 3]]))
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.rwkv = model

    def forward(self, input_ids: Tensor, **unused: Any) -> Any:
        from types import SimpleNamespace

        logits = [self.rwkv.forward(row.tolist(), None, full_output=True)[0] for row in input_ids]
        return SimpleNamespace(logits=torch.stack([torch.as_tensor(x).float() for x in logits]))

    @staticmethod
    def tokenizer() -> Any:
        """The World tokenizer that ships with the package (``rwkv_vocab_v20230424``)."""
        import rwkv.utils as utils
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        vocab = Path(utils.__file__).parent / "rwkv_vocab_v20230424.txt"
        return TRIE_TOKENIZER(str(vocab))


def tiny_checkpoint(
    version: str | float,
    path: str | os.PathLike,
    *,
    n_embd: int = 16,
    head_size: int = 8,
    n_layer: int = 2,
    vocab: int = 64,
    ffn: int = 32,
    seed: int = 0,
    time_state: bool = False,
) -> Path:
    """Write a tiny random checkpoint of RWKV ``version`` ("4", "5", "5.1", "5.2", "6" or "7") in the
    package's own format (a dict of tensors in torch ``Linear`` layout) and return its path.

    Weights are O(1) so that every factor matters: decays ``w`` between about 0.2 and 0.99, bonuses and
    mixes of order one. ``time_state`` (v5/v6) adds learned initial states. Example::

        model = load_checkpoint(tiny_checkpoint("6", "/tmp/v6.pth"))
    """
    gen = torch.Generator().manual_seed(seed)
    v = str(version).rstrip("0").rstrip(".") if "." in str(version) else str(version)
    if v not in ("4", "5", "5.1", "5.2", "6", "7"):
        raise ValueError(f"version must be one of 4, 5, 5.1, 5.2, 6, 7; got {version!r}")
    C, N = n_embd, head_size
    if C % N:
        raise ValueError(f"n_embd={C} is not a multiple of head_size={N}")
    H = C // N

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    def linear(out: int, inp: int) -> Tensor:
        return randn(out, inp, scale=1 / math.sqrt(inp))

    def norm(prefix: str, width: int = C) -> None:
        w[prefix + ".weight"] = 1 + randn(width, scale=0.2)
        w[prefix + ".bias"] = randn(width, scale=0.2)

    w: dict[str, Tensor] = {"emb.weight": randn(vocab, C)}
    norm("blocks.0.ln0")
    for i in range(n_layer):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        norm(b + "ln1")
        norm(b + "ln2")
        if v == "7":
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
                w[a + name] = uniform(1, 1, C)
            w[a + "w0"] = randn(1, 1, C)
            for name in ("w", "a", "v", "g"):
                if name == "v" and i == 0:
                    continue  # layer 0 has no value-residual mixing
                w[a + f"{name}1"] = randn(C, 4, scale=0.3)
                w[a + f"{name}2"] = randn(4, C, scale=0.3)
            w[a + "a0"] = randn(1, 1, C, scale=0.5)
            if i > 0:
                w[a + "v0"] = randn(1, 1, C, scale=0.5)
            w[a + "k_k"] = 1 + randn(1, 1, C, scale=0.2)
            w[a + "k_a"] = uniform(1, 1, C)
            w[a + "r_k"] = randn(H, N, scale=0.5)
            for name in ("receptance", "key", "value", "output"):
                w[a + name + ".weight"] = linear(C, C)
            norm(a + "ln_x")
            w[f + "x_k"] = uniform(1, 1, C)
            w[f + "key.weight"] = linear(ffn, C)
            w[f + "value.weight"] = linear(C, ffn)
            continue
        gated = v not in ("4", "5")
        if v != "4":  # before time_decay: the package reads the version from the keys in order
            norm(a + "ln_x")
        if v == "6":
            for name in ("x", "w", "k", "v", "r", "g"):
                w[a + "time_maa_" + name] = uniform(1, 1, C)
            w[a + "time_maa_w1"] = randn(C, 5 * 4, scale=0.3)
            w[a + "time_maa_w2"] = randn(5, 4, C, scale=0.3)
            w[a + "time_decay"] = uniform(1, 1, C, lo=-3.0, hi=0.5)
            w[a + "time_decay_w1"] = randn(C, 8, scale=0.3)
            w[a + "time_decay_w2"] = randn(8, C, scale=0.3)
            w[a + "time_faaaa"] = randn(H, N, scale=0.5)  # after the time_maa keys: the package reads H here
        else:
            for name in ("k", "v", "r") + (("g",) if gated else ()):
                w[a + "time_mix_" + name] = uniform(1, 1, C)
            if v == "4":
                w[a + "time_decay"] = uniform(C, lo=-2.0, hi=1.5)
                w[a + "time_first"] = randn(C, scale=0.5)
            elif v in ("5", "5.1"):
                w[a + "time_decay"] = uniform(H, lo=-3.0, hi=0.5)
                w[a + "time_first"] = randn(H, scale=0.5)
            else:
                w[a + "time_decay"] = uniform(H, N, lo=-3.0, hi=0.5)
                w[a + "time_first"] = randn(H, N, scale=0.5)
        for name in ("key", "value", "receptance", "output") + (("gate",) if gated else ()):
            w[a + name + ".weight"] = linear(C, C)
        if v != "4" and time_state:
            w[a + "time_state"] = randn(H, N, N, scale=0.5)
        if v == "6":
            w[f + "time_maa_k"] = uniform(1, 1, C)
            w[f + "time_maa_r"] = uniform(1, 1, C)
        else:
            w[f + "time_mix_k"] = uniform(1, 1, C)
            w[f + "time_mix_r"] = uniform(1, 1, C)
        w[f + "key.weight"] = linear(ffn, C)
        w[f + "value.weight"] = linear(C, ffn)
        w[f + "receptance.weight"] = linear(C, C)
    norm("ln_out")
    w["head.weight"] = linear(vocab, C)
    path = Path(path)
    torch.save(w, path)
    return path


class InstancePatch:
    """Sets ``obj.<name> = value`` in the instance's own ``__dict__`` (shadowing the class's method, also on a
    TorchScript module) and puts back what was there on :meth:`remove`."""

    def __init__(self, obj: Any, name: str, value: Any):
        self.obj, self.name = obj, name
        self._had = name in obj.__dict__
        self._old = obj.__dict__.get(name)
        obj.__dict__[name] = value

    def remove(self) -> None:
        if self.obj is None:
            return
        if self._had:
            self.obj.__dict__[self.name] = self._old
        else:
            self.obj.__dict__.pop(self.name, None)
        self.obj = None


def unpatched(obj: Any, name: str) -> Any:
    """``obj.<name>`` as its class (or TorchScript) defines it, ignoring an instance attribute (a patch)."""
    if name not in obj.__dict__:
        return getattr(obj, name)
    saved = obj.__dict__.pop(name)
    try:
        return getattr(obj, name)
    finally:
        obj.__dict__[name] = saved


def parameter_names(method: Any) -> list[str]:
    """Argument names of a (script) method, without ``self``."""
    schema = getattr(method, "schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
        return names[1:] if names and names[0] == "self" else names
    return list(inspect.signature(method).parameters)


def package_matmul(
    a: Tensor, w: Tensor, mx: Tensor, rx: Tensor, my: Tensor, ry: Tensor, out: torch.dtype
) -> Tensor:
    """The package's ``matmul``: ``a @ w`` in ``a``'s dtype (``w`` dequantised if uint8), cast to ``out``."""
    if w.dtype == torch.uint8:
        w = (w.to(a.dtype) + 0.5) * ry * rx + my + mx
    return (a @ w).to(out)


def freeze_group_norm(mixed: Tensor, eps: float = GROUP_NORM_EPS) -> tuple[Tensor, Tensor]:
    """``(μ, σ)`` of the group norm over each head's channels: ``mixed (..., H, L, N)`` → ``(..., H, L)``."""
    mean = mixed.mean(-1)
    var = (mixed - mean[..., None]).pow(2).mean(-1)
    return mean, torch.sqrt(var + eps)


def heads_to_channels(t: Tensor) -> Tensor:
    """``(B, H, L, N)`` → ``(B, H·N, L)`` (channel ``c = h·N + n``)."""
    B, H, L, N = t.shape
    return t.permute(0, 1, 3, 2).reshape(B, H * N, L)


def channels_to_heads(t: Tensor, head_size: int) -> Tensor:
    """``(B, H·N, L)`` → ``(B, H, L, N)``."""
    B, C, L = t.shape
    return t.reshape(B, C // head_size, head_size, L).permute(0, 1, 3, 2)


# --- cores ---------------------------------------------------------------------------------------------
class HeadCore(Core):
    """A core whose mixing ``R_h`` is shared by the ``N`` channels of each head, plus a per-head diagonal.

    Entries for channel ``c`` of head ``h``: ``row_scale[c, t] · R_h[t, j] + [t = j] · skip[h, t]``.
    Subclasses compute blocks of ``R_h`` (:meth:`head_block`, float64) and the scan :meth:`mix`. The head
    blocks of the last call are kept, so that consecutive channel tiles of one head compute it once.
    """

    has_skip = True

    def __init__(
        self, head_size: int, dtype: torch.dtype, skip: Tensor | None, row_scale: Tensor | None = None
    ):
        self.head_size = head_size
        self.dtype = dtype
        self.skip = skip  # (B, H, L) float64
        self.has_skip = skip is not None
        self.row_scale = row_scale  # (B, C, L) float64 or None
        self._last: tuple | None = None  # (b, rows, cols, {head: block})

    def head_block(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """``R_h[rows, cols]`` for each head in ``heads``: ``(nh, nr, ncol)`` float64."""
        raise NotImplementedError

    def mix(self, b: int, values: Tensor | None, state: Tensor | None) -> Tensor:
        """``R_h · values + state term`` by a chunked scan: ``values (H, L, N)`` → ``(H, L, N)`` float64."""
        raise NotImplementedError

    def _heads(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        last = self._last
        same = (
            last is not None
            and last[0] == b
            and last[1].shape == rows.shape
            and last[2].shape == cols.shape
            and bool(torch.equal(last[1], rows))
            and bool(torch.equal(last[2], cols))
        )
        known = last[3] if same else {}
        wanted = heads.tolist()
        missing = [h for h in wanted if h not in known]
        if missing:
            fresh = self.head_block(b, torch.tensor(missing, device=heads.device), rows, cols).to(self.dtype)
            known = {**known, **dict(zip(missing, fresh))}
        self._last = (b, rows.clone(), cols.clone(), {h: known[h] for h in wanted})
        return torch.stack([known[h] for h in wanted])

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        dtype = self.dtype
        out = torch.zeros(len(chans), len(rows), len(cols), dtype=dtype, device=chans.device)
        head_of = torch.div(chans, self.head_size, rounding_mode="floor")
        if ssm:
            heads, inverse = torch.unique(head_of, return_inverse=True)
            out = self._heads(b, heads, rows, cols).index_select(0, inverse)
            if self.row_scale is not None:
                scale = self.row_scale[b].index_select(0, chans).index_select(1, rows).to(dtype)
                out = out * scale[:, :, None]
        if skip and self.skip is not None:
            eye = (rows[:, None] == cols[None, :]).to(dtype)
            out = (
                out + self.skip[b].index_select(0, head_of).index_select(1, rows).to(dtype)[:, :, None] * eye
            )
        return out

    def matvec(self, b: int, x: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        """``(core) @ x`` for every channel, ``x (C, L)``, by the chunked scan."""
        N = self.head_size
        xh = channels_to_heads(x[None].to(_F64), N)[0]  # (H, L, N)
        out = torch.zeros_like(xh)
        if ssm:
            mixed = heads_to_channels(self.mix(b, xh, None)[None])[0]  # (C, L)
            out = mixed if self.row_scale is None else mixed * self.row_scale[b]
        else:
            out = heads_to_channels(out[None])[0]
        if skip and self.skip is not None:
            out = out + self.skip[b].repeat_interleave(N, 0) * x.to(_F64)
        return out.to(self.dtype)


class DiagonalStateCore(HeadCore):
    """``R_h + diag(D_h)`` of an RWKV-5/6 call: matrix-valued state per head, diagonal decay per key channel.

    Shapes: ``receptance``/``key``/``log_decay (B, H, L, N)``, ``bonus (H, N)``. Entries::

        R_h[t, j] = Σ_i r_t[i] · exp(S_{t−1}[i] − S_j[i]) · k_j[i]   (j < t)      S = cumsum(log w), float64
        D_h[t]    = Σ_i r_t[i] · u[i] · k_t[i]

    Positions are cut into chunks of ``Q``. :meth:`chunked` (the default for blocks) factorises a pair in
    chunks ``J < I`` through the chunk boundaries::

        exp(S_{t−1} − S_j) = exp(S_{t−1} − S_{s_I−1}) · exp(S_{s_I−1} − S_{e_J}) · exp(S_{e_J} − S_j)

    every exponent ≤ 0, so far pairs are one matrix product over ``i`` per column chunk; pairs inside a chunk
    take their own exponentials. :meth:`direct` is the readable twin (one exponential per entry and ``i``).
    :meth:`mix` runs the recurrence chunk by chunk (the state ``(N, N)`` carried between chunks).
    """

    # per entry, in float32 elements: the float64 head block (2) and its cast (1), the channel expansion (1),
    # its scaled copy (1) and the diagonal mask (1); row and column vectors are O(rows + cols) per head
    work_per_entry = 6
    #: positions per chunk: ``(H, Q, Q, N)`` temporaries in :meth:`mix`, loops over ``L / Q`` chunks
    default_chunk = 32

    def __init__(
        self,
        receptance: Tensor,
        key: Tensor,
        log_decay: Tensor,
        bonus: Tensor,
        dtype: torch.dtype,
        chunk: int | None = None,
    ):
        self.r, self.k = receptance.to(_F64), key.to(_F64)
        # segsum: Sp[..., p + 1, :] = Σ_{m ≤ p} log w_m and Sp[..., 0, :] = 0
        self.Sp = F.pad(log_decay.to(_F64).cumsum(2), (0, 0, 1, 0))
        D = torch.einsum("bhti,hi,bhti->bht", self.r, bonus.to(_F64), self.k)
        super().__init__(receptance.shape[-1], dtype, D)
        self.chunk = chunk or self.default_chunk

    def head_block(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        return self.chunked(b, heads, rows, cols)

    def chunked(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """``R_h[rows, cols]`` through chunk boundaries: ``(nh, nr, ncol)`` float64."""
        Q, L = self.chunk, self.r.shape[2]
        r, k = self.r[b].index_select(0, heads), self.k[b].index_select(0, heads)  # (nh, L, N)
        Sp = self.Sp[b].index_select(0, heads)  # (nh, L + 1, N)
        nh, N = r.shape[0], r.shape[-1]
        row_chunk, col_chunk = (
            torch.div(rows, Q, rounding_mode="floor"),
            torch.div(cols, Q, rounding_mode="floor"),
        )
        start = row_chunk * Q  # s_I: the first position of the row's chunk
        S_row, r_row = Sp.index_select(1, rows), r.index_select(1, rows)  # S_{t−1}, r_t: (nh, nr, N)
        # inside the row's chunk: band[t, q] = R[t, s_I + q] for s_I + q < t, one exponential per i
        band_at = start[:, None] + torch.arange(Q, device=rows.device)[None, :]  # (nr, Q)
        earlier = band_at < rows[:, None]
        band_at = band_at.clamp(max=L - 1).flatten()
        band = torch.zeros(nh, len(rows), Q, dtype=_F64, device=rows.device)
        for i in range(N):  # the head size, not the sequence length
            S_band = Sp[:, :, i].index_select(1, band_at + 1).view(nh, len(rows), Q)  # S_j
            gap = (S_row[:, :, i, None] - S_band).masked_fill(~earlier, float("-inf"))
            band = band + torch.exp(gap) * r_row[:, :, i, None] * k[:, :, i].index_select(1, band_at).view_as(
                band
            )
        offset = (cols[None, :] - start[:, None]).clamp(0, Q - 1).expand(nh, -1, -1)
        inside = (col_chunk[None, :] == row_chunk[:, None]) & (cols[None, :] < rows[:, None])
        out = band.gather(2, offset) * inside.to(_F64)
        # across chunks J < I: U_t · e^{S_{s_I−1} − S_{e_J}} · V_j, all exponents ≤ 0, with
        # U_t = r_t e^{S_{t−1} − S_{s_I−1}} and V_j = k_j e^{S_{e_J} − S_j}
        first, last = int(col_chunk.min()), int(row_chunk.max())
        if first < last:
            U = r_row * torch.exp(S_row - Sp.index_select(1, start))  # (nh, nr, N)
            S_start = Sp.index_select(1, start)
            by_chunk: dict[int, list[int]] = {}
            for i, c in enumerate(col_chunk.tolist()):
                by_chunk.setdefault(c, []).append(i)
            for J, members in by_chunk.items():  # column chunks, not positions
                if J >= last:
                    continue
                sel = torch.tensor(members, device=rows.device)
                at = cols.index_select(0, sel)
                end = min((J + 1) * Q, L)  # Sp[end] = S_{e_J}
                V = k.index_select(1, at) * torch.exp(Sp[:, end, None, :] - Sp.index_select(1, at + 1))
                later = (row_chunk > J).to(_F64)[None, :, None]
                W = U * torch.exp((S_start - Sp[:, end, None, :]).clamp_max(0)) * later
                out.index_add_(2, sel, W @ V.transpose(-1, -2))
        return out

    def direct(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """``R_h[rows, cols]`` with one exponential per entry and key channel: ``(nh, nr, ncol)`` float64."""
        r = self.r[b].index_select(0, heads).index_select(1, rows)  # (nh, nr, N)
        k = self.k[b].index_select(0, heads).index_select(1, cols)  # (nh, ncol, N)
        Sp = self.Sp[b].index_select(0, heads)
        S_row, S_col = Sp.index_select(1, rows), Sp.index_select(1, cols + 1)  # S_{t−1}, S_j
        later = rows[:, None] > cols[None, :]
        out = torch.zeros(len(heads), len(rows), len(cols), dtype=_F64, device=rows.device)
        for i in range(r.shape[-1]):  # the head size, not the sequence length
            gap = (S_row[:, :, i, None] - S_col[:, None, :, i]).masked_fill(~later, float("-inf"))
            out = out + torch.exp(gap) * (r[:, :, i, None] * k[:, None, :, i])
        return out

    def mix(self, b: int, values: Tensor | None, state: Tensor | None) -> Tensor:
        """``Σ_{j<t} R_h[t, j] v_j + r_t · (Π_{m<t} w_m) S_0`` per head: ``(H, L, N)`` float64 (no bonus).

        ``state`` is ``S_0 (H, N_key, N_value)``, the package's layout.
        """
        r, k, Sp = self.r[b], self.k[b], self.Sp[b]
        H, L, N = r.shape
        out = torch.zeros(H, L, N, dtype=_F64, device=r.device)
        S = torch.zeros(H, N, N, dtype=_F64, device=r.device) if state is None else state.to(_F64)
        v = None if values is None else values.to(_F64)
        for s in range(0, L, self.chunk):  # chunks of the sequence, not positions
            e = min(s + self.chunk, L)
            rr, kk, Sloc = r[:, s:e], k[:, s:e], Sp[:, s : e + 1]  # Sloc[a] = S_{s+a−1}
            if v is not None:  # pairs inside the chunk: exp(S_{t−1} − S_j), j < t
                gap = Sloc[:, :-1, None, :] - Sloc[:, None, 1:, :]  # (H, q, q, N)
                later = torch.ones(e - s, e - s, dtype=torch.bool, device=r.device).tril(-1)
                gap = gap.masked_fill(~later[..., None], float("-inf"))
                inner = torch.einsum("hai,hbi,habi->hab", rr, kk, torch.exp(gap))
                out[:, s:e] = inner @ v[:, s:e]
            # the state carried into the chunk, decayed by w_s … w_{t−1}
            out[:, s:e] += torch.einsum("hai,hin->han", rr * torch.exp(Sloc[:, :-1] - Sloc[:, :1]), S)
            S = torch.exp(Sloc[:, -1] - Sloc[:, 0])[..., None] * S
            if v is not None:
                S = S + torch.einsum("hbi,hbn->hin", kk * torch.exp(Sloc[:, -1:] - Sloc[:, 1:]), v[:, s:e])
        return out


# --- the patcher --------------------------------------------------------------------------------------------
#: time-mix methods ``RWKV.forward`` looks up, per version (v5.2's single-token path is ``att_one_v5_1``).
ATT_METHODS = {
    4.0: ("att_seq", "att_one", "cuda_att_seq"),
    5.0: ("att_seq_v5", "att_one_v5"),
    5.1: ("att_seq_v5_1", "att_one_v5_1"),
    5.2: ("att_seq_v5_2", "att_one_v5_1", "cuda_att_seq_v5_2"),
    6.0: ("att_seq_v6_0", "att_one_v6_0", "cuda_att_seq_v6_0"),
}
_STATE_ARGS = ("aa", "bb", "pp", "s")
_PROJECTIONS = {"kw": "key", "vw": "value", "rw": "receptance", "gw": "gate", "ow": "output"}
_ACTIVATIONS = ("x", "sx", *_STATE_ARGS)


class RWKVPackagePatcher(Patcher):
    """``rwkv.model.RWKV`` (v4, v5, v5.1, v5.2, v6): one patcher for the whole model, one record per layer
    call.

    Records are named ``"blocks.{i}.att"`` (prefixed by the model's own name inside a larger module).
    """

    kind = "rwkv"
    holds_blocks = False
    real_output_key = "real_output"

    def __init__(self, module: torch.nn.Module, name: str):
        super().__init__(module, name)
        self.version = float(module.version)
        if self.version not in ATT_METHODS:
            raise UnsupportedInputError(f"rwkv package model of version {self.version} is not supported")

    @property
    def record_kind(self) -> str:
        return {4: "rwkv4", 5: "rwkv5", 6: "rwkv6"}[int(self.version)]

    def block_name(self, layer: int | None) -> str:
        prefix = f"{self.name}." if self.name else ""
        return f"{prefix}blocks.{'?' if layer is None else layer}.att"

    # --- recording ----------------------------------------------------------------------------------
    def attach(self, on_record: Callable[[BlockRecord], None], *, grad: bool = False,
               replacements: Replacements | None = None) -> list:  # fmt: skip
        """Patch the model's time-mix entry points; returns their handles. Each call brings its weights as
        arguments, so ``replacements`` are not needed."""
        model = self.module
        n_layer = model.args.n_layer
        layer_of = {id(model.w[f"blocks.{i}.ln1.weight"]): i for i in range(n_layer)}
        # Streamed layers ("*N+" strategies) receive fresh device copies of their projections on every call:
        # records keep the stored weights instead, moved to the device when a view is built.
        self.stored = {
            i: {k: model.w[key] for k, key in self._projections(i).items() if key in model.w}
            for i in range(n_layer)
            if getattr(model.strategy[i], "stream", False)
        }
        handles = []
        for method in ATT_METHODS[self.version]:
            original = getattr(model, method, None)
            if original is None:  # cuda_* exist only when the package was imported with RWKV_CUDA_ON=1
                continue
            compiled = unpatched(model, method)  # not another recording's wrapper: its names, and for replays
            wrapper = self._wrapper(method, original, parameter_names(compiled), layer_of, on_record, grad)
            wrapper.unpatched = compiled
            handles.append(InstancePatch(model, method, wrapper))
        return handles

    def _wrapper(self, method, original, names, layer_of, on_record, grad):
        def keep(t: Any) -> Any:
            return t if (grad or not isinstance(t, Tensor)) else t.detach()

        def time_mix(*args: Any, **kwargs: Any) -> Any:
            named = dict(zip(names, args))
            named.update(kwargs)
            layer = layer_of.get(id(named.get("ln_w")))
            record = BlockRecord(self.block_name(layer), self.record_kind, self, grad=grad)
            x = named.get("x")
            # States may be updated in place by the CUDA kernels: keep copies (a few (H, N, N) per layer).
            inputs = {k: (keep(v).clone() if k in _STATE_ARGS else keep(v)) for k, v in named.items()}
            inputs.update({k: w for k, w in self.stored.get(layer, {}).items() if k in inputs})
            record.raw.update(
                method=method, layer=layer, inputs=inputs, replay=time_mix.unpatched, names=names
            )
            weights = {
                k: v
                for k, v in inputs.items()
                if isinstance(v, Tensor) and k not in _ACTIVATIONS and v is not x
            }
            record.weights = {k: keep(v) for k, v in weights.items()}
            record.weight_versions = {k: v._version for k, v in weights.items()}
            self._open.append(record)
            on_record(record)
            try:
                out = original(*args, **kwargs)
            except BaseException:
                record.status = "failed"
                raise
            finally:
                if record in self._open:
                    self._open.remove(record)
            record.status = "complete"
            return out

        return time_mix

    @staticmethod
    def _projections(layer: int) -> dict[str, str]:
        return {k: f"blocks.{layer}.att.{name}.weight" for k, name in _PROJECTIONS.items()}

    def inputs(self, record: BlockRecord) -> dict[str, Any]:
        """The call's arguments by name, every tensor on the device of its input ``x``."""
        n = dict(record.raw["inputs"])
        device = n["x"].device
        return {
            k: (v.to(device) if isinstance(v, Tensor) and v.device != device else v) for k, v in n.items()
        }

    # --- the real output, by replay -------------------------------------------------------------------
    def real_output(self, record: BlockRecord) -> Tensor | None:
        """The time mix's output before its output projection, ``(1, C, L)`` float32.

        The model never materialises it (it returns ``x + y · W_o``): the compiled method is replayed on the
        recorded inputs with ``W_o = 2^s · I`` (exact), and ``y = (x + 2^s·y − x) / 2^s`` in float64 (the
        only rounding is that of ``x + 2^s·y``, ~2^−24 of ``2^s·|y|``).
        """
        key = self.real_output_key
        if key not in record.raw:
            n = self.inputs(record)
            x, ow = n["x"], n["ow"]
            scale = 2.0**4 if x.dtype == torch.float16 else 2.0**16
            n["ow"] = torch.eye(ow.shape[-1], dtype=x.dtype, device=x.device) * scale
            for k in _STATE_ARGS:
                if k in n:
                    n[k] = n[k].clone()
            with torch.no_grad():
                out = record.raw["replay"](*[n[name] for name in record.raw["names"]])[0]
            y = (out.to(_F64) - x.to(_F64)) / scale
            record.raw[key] = (y if y.dim() == 2 else y[None]).to(torch.float32)[None]  # (1, L, C)
        return record.raw[key].transpose(1, 2)

    # --- derivation -----------------------------------------------------------------------------------
    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Every per-call quantity (cached per dtype); shapes ``(1, C, L)`` unless noted."""
        if dtype in record.cache:
            return record.cache[dtype]
        require(
            "inputs" in record.raw,
            f"{record.name}: this record holds no time-mix inputs (recorded by another patcher?)",
        )
        require(record.raw.get("layer") is not None, f"{record.name}: the layer of this call is unknown")
        n = self.inputs(record)
        x = n["x"] if n["x"].dim() == 2 else n["x"][None]  # (L, C) in the model's dtype
        C = x.shape[-1]

        def proj(inp: Tensor, name: str, out: torch.dtype | None = torch.float32) -> Tensor:
            q = [n.get(f"{name}{s}") for s in _QUANT]
            return package_matmul(inp, n[f"{name}w"], *q, out=out or inp.dtype)

        xx = F.layer_norm(x, (C,), weight=n["ln_w"], bias=n["ln_b"])
        prev = torch.cat([n["sx"][None].to(xx.dtype), xx[:-1]])  # the token shift
        if self.version == 6.0:
            dx = prev - xx
            mix = torch.tanh((xx + dx * n["x_maa"]) @ n["tm_w1"]).view(len(x), 5, -1).transpose(0, 1)
            mw, mk, mv, mr, mg = torch.bmm(mix, n["tm_w2"]).view(5, len(x), -1).unbind(0)
            wx, kx, vx, rx, gx = (
                xx + dx * (n[f"{p}_maa"] + m) for p, m in zip("wkvrg", (mw, mk, mv, mr, mg))
            )
        else:
            kx, vx, rx = (xx * n[f"{p}_mix"] + prev * (1 - n[f"{p}_mix"]) for p in "kvr")
            gx = xx * n["g_mix"] + prev * (1 - n["g_mix"]) if "g_mix" in n else None

        def chans(t: Tensor) -> Tensor:  # (L, C) → (1, C, L) in dtype
            return t.transpose(0, 1)[None].to(dtype)

        derived: dict[str, Any] = {}
        if self.version == 4.0:
            return self._derive_v4(record, dtype, n, proj, kx, vx, rx, chans)
        H = n["t_decay"].shape[0]
        N = C // H
        r = proj(rx, "r")
        k = proj(kx, "k")
        v = proj(vx, "v")
        if gx is not None:
            g = proj(gx, "g", None)
            derived.update(gate=chans(F.silu(g)), gate_preact=chans(g))
        L = len(x)
        if self.version == 6.0:
            z = n["t_decay"].view(1, H, N) + (torch.tanh(wx @ n["td_w1"]) @ n["td_w2"]).float().view(L, H, N)
            log_decay = -torch.exp(z.to(_F64)).permute(1, 0, 2)  # (H, L, N)
        else:  # the package stores w = exp(−exp(time_decay)); w = 0 (full forgetting) stays finite
            w = n["t_decay"].reshape(H, -1).expand(H, N).to(_F64)
            log_decay = torch.log(w).clamp_min(-1e4)[:, None, :].expand(H, L, N)
        bonus = n["t_first"].reshape(H, -1).expand(H, N)

        def heads(t: Tensor) -> Tensor:  # (L, C) → (1, H, L, N)
            return t.reshape(L, H, N).permute(1, 0, 2)[None]

        core = DiagonalStateCore(heads(r), heads(k), log_decay[None], bonus, dtype)
        state = n["s"].to(_F64)  # (H, N_key, N_value)
        values = heads(v).to(_F64)[0]
        mixed = core.mix(0, values, state) + core.skip[0][..., None] * values  # (H, L, N): the wkv
        mean, std = freeze_group_norm(mixed)
        gamma, beta = n["lx_w"].to(_F64), n["lx_b"].to(_F64)
        require(
            bool((gamma != 0).all()),
            f"{record.name}: ln_x.weight has exact zeros; the group norm's bias cannot pass through its "
            "frozen "
            "scale γ/σ on those channels",
        )
        carried = core.mix(0, None, state)  # (H, L, N): r_t · (Π w) S_0

        def expand(t: Tensor) -> Tensor:  # (H, L) → (1, C, L)
            return t.repeat_interleave(N, 0)[None]

        norm = gamma[None, :, None] / expand(std)
        offset = (
            heads_to_channels(carried[None])
            - expand(mean)
            + beta[None, :, None] * expand(std) / gamma[None, :, None]
        )
        derived.update(
            values=chans(v),
            receptance=chans(r),
            key=chans(k),
            log_decay=heads_to_channels(log_decay[None]).to(dtype),
            bonus=bonus.reshape(-1).to(dtype),
            wkv=heads_to_channels(mixed[None]).to(dtype),
            norm=norm.to(dtype),
            norm_mean=expand(mean).to(dtype),
            norm_std=expand(std).to(dtype),
            state_offset=offset.to(dtype),
            initial_state=state.to(dtype)[None],
            core=core,
            head_size=N,
        )
        record.cache[dtype] = derived
        return derived

    def _derive_v4(self, record, dtype, n, proj, kx, vx, rx, chans) -> dict[str, Any]:
        receptance = proj(rx, "r", None)
        k = proj(kx, "k")
        v = proj(vx, "v")
        w = -n["t_decay"].to(_F64)  # the package stores −exp(time_decay)
        u = n["t_first"].to(_F64)
        num, den, top = (n[s].to(_F64)[None] for s in ("aa", "bb", "pp"))  # (1, C)
        require(bool((den >= 0).all()), f"{record.name}: the carried state has a negative denominator")
        key = chans(k).to(_F64)
        log_z = log_normaliser(key, w, u, torch.log(den) + top)
        pos = torch.arange(key.shape[-1], device=key.device, dtype=_F64)
        offset = num[..., None] * torch.exp(top[..., None] - pos * w[:, None] - log_z)
        derived = dict(
            values=chans(v),
            key=chans(k),
            key_f64=key,
            receptance=chans(receptance),
            gate=chans(torch.sigmoid(receptance)),
            w=w,
            u=u,
            log_z=log_z,
            state_offset=offset.to(dtype),
            initial_state=torch.stack([num, den, top]).to(dtype),
        )
        record.cache[dtype] = derived
        return derived

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        if self.version == 4.0:
            return Factors(
                values=d["values"],
                core=WKVCore(d["key_f64"], d["w"], d["u"], d["log_z"], dtype),
                left={"gate": d["gate"]},
                state_offset=d["state_offset"],
            )
        left = {"norm": d["norm"]}
        if "gate" in d:
            left["gate"] = d["gate"]
        C = d["values"].shape[1]
        return Factors(
            values=d["values"],
            core=d["core"],
            left=left,
            state_offset=d["state_offset"],
            groups={"heads": torch.arange(C, device=d["values"].device) // d["head_size"]},
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Callable[[], Tensor]]:
        def get(key: str) -> Callable[[], Tensor]:
            return lambda: self.derive(record, dtype)[key].to(dtype)

        if self.version == 4.0:
            names = ("values", "key", "receptance", "gate", "initial_state")
            thunks = {k: get(k) for k in names}
            thunks.update(
                decay=lambda: torch.exp(-self.derive(record, dtype)["w"]).to(dtype),  # (C,)
                decay_rate=get("w"),
                bonus=get("u"),
                log_normaliser=get("log_z"),
            )
            return thunks
        names = ("values", "key", "receptance", "log_decay", "bonus", "wkv", "norm", "norm_mean", "norm_std")
        thunks = {k: get(k) for k in (*names, "initial_state")}
        thunks["decay"] = lambda: torch.exp(self.derive(record, dtype)["log_decay"].to(_F64)).to(dtype)
        if self.version != 5.0:
            thunks["gate"] = get("gate")
            thunks["gate_preact"] = get("gate_preact")
        return thunks
