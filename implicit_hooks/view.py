"""The lazy implicit attention of one block call: ``A = G · (R + diag(D)) · Z · M · P``.

Per batch row ``b`` and channel ``c`` (see ``docs/maths.md``)::

    y[b, c] = A[b, c] @ x[b, c] + bias[b, c]
    A       = left · core · right · conv · input_mask

* ``left``  – diagonal factors on the rows: the output gate, a frozen normaliser (``G``).
* ``core``  – the data-controlled lower-triangular mixing ``R`` plus the skip ``diag(D)``; one
  :class:`Core` object per family computes any block of it.
* ``right`` – diagonal factors between the core and the conv: the activation slope ``Z`` and the
  padding mask the block applies after its conv.
* ``conv``  – the causal depthwise short convolution ``M`` (banded Toeplitz, ``K`` taps).
* ``input_mask`` – ``P``: zero for positions the block zeroed before its input projection.

``bias`` collects everything that does not come from ``x``: the conv bias, a conv state carried from a
previous call and padded inputs (``conv_offset``, pushed through ``core · right``), plus an initial
recurrent state (``state_offset``, added after the core). Nothing is materialised until asked: every
read is computed tile by tile over channels and rows, so a row costs ``O(L)`` per channel and a
channel mean never holds ``channels × L × L``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: Largest number of elements one tile of intermediate work may hold (about 64 MB in float32).
DEFAULT_TILE_ELEMENTS = 1 << 24
#: How entries are assembled: see :meth:`AttentionView.with_backend`.
BACKENDS = ("auto", "torch", "triton")
#: Elements of the per-channel arrays a fused kernel's preparation may hold at once (256 MB in float32).
FUSED_PREP_ELEMENTS = 1 << 26
#: Reads of fewer rows go to the torch path under ``backend="auto"`` (rows cost O(L) per channel there),
#: unless the core says its kernel serves them faster (``Core.fused_rows``).
FUSED_MIN_ROWS = 16


def take(t: Tensor, chans: Tensor | slice, dim: int = 0) -> Tensor:
    """The entries ``chans`` of ``t`` along ``dim``: a view for a run of channels (a ``slice``, as fused reads
    of whole channel ranges pass them to :meth:`Core.tiles`: no copy, no kernel launched; ``t`` itself for all
    of them, as a narrow costs the host a few µs on a GPU machine), else a gather."""
    if isinstance(chans, slice):
        if chans.start == 0 and chans.stop == t.shape[dim]:
            return t
        return t.narrow(dim, chans.start, chans.stop - chans.start)
    return t.index_select(dim, chans)


def _product(parts: list[Tensor], mask: Tensor | None, n: int) -> Tensor:
    """The product of ``(n, L)`` factors ``parts`` and a ``(1, L)`` ``mask`` (either may be missing)."""
    if not parts:
        return mask.expand(n, -1)
    out = parts[0]
    for part in parts[1:]:
        out = out * part
    return out if mask is None else out * mask


def count(chans: Tensor | slice) -> int:
    """How many channels ``chans`` (a list or a run, as :func:`take` takes them) names."""
    return chans.stop - chans.start if isinstance(chans, slice) else len(chans)


class Core:
    """The data-controlled mixing ``R (+ diag(D))`` of one block call, lower triangular per channel.

    Subclasses compute any block of it; they never build the whole matrix unless asked to.

    Attributes:
        work_per_entry: elements of temporary memory per computed entry (guides tile sizes).
        has_skip: whether the block has a skip term ``D``.
    """

    work_per_entry: int = 1
    has_skip: bool = False
    #: whether ``backend="auto"`` uses :meth:`tiles` on CUDA (a kernel that has not run on a GPU yet says
    #: False; ``backend="triton"`` still uses it)
    fused_by_default: bool = True
    #: whether ``backend="auto"`` also takes :meth:`tiles` for reads of fewer than ``FUSED_MIN_ROWS`` rows
    #: (a last-token row): where the torch path's rows cost more than whole 64-row tiles in the kernel
    fused_rows: bool = False
    #: elements per channel and position that :meth:`tiles` prepares (guides the channel chunks)
    fused_work: int = 64  # U, V, W of 16 states and a few per-position arrays (Mamba-1)

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        """Entries ``[chans, rows, cols]`` of batch row ``b``: shape ``(len(chans), len(rows), len(cols))``.

        ``ssm`` selects the recurrence ``R``, ``skip`` the diagonal ``D``; both may be off (zeros).
        """
        raise NotImplementedError

    def block_range(
        self, b: int, chans: Tensor, rows: Tensor, c0: int, c1: int, *, ssm: bool, skip: bool
    ) -> Tensor:
        """:meth:`block` for the columns ``c0 … c1 − 1``, a range the caller knows on the host (so that a core
        with a faster path for ranges need not read its columns back from the device to find out)."""
        return self.block(b, chans, rows, torch.arange(c0, c1, device=rows.device), ssm=ssm, skip=skip)

    def tiles(self, b: int, chans: Tensor | slice, **parts: Any) -> Any:
        """A fused assembler for whole tiles (``.dense(r0, r1, c0, c1)``, ``.reduce(...)``), or None.

        ``chans``: channel ids on the device, or a run of them as a ``slice`` (read with :func:`take`).
        ``parts``: ``left``, ``right`` (``(nc, L)`` or None), ``taps`` (``(nc, K)`` or None),
        ``input_mask`` (``(L,)`` or None), ``ssm``, ``skip``. Cores without a kernel return None and the
        view falls back to :meth:`block`.
        """
        return None

    def tile_parts(self, chans: Tensor | slice) -> list[Tensor] | None:
        """Positions into ``chans`` that one :meth:`tiles` call can take together; None: all at once."""
        return None

    def rows_of(self, b: int, *names: str) -> tuple[Tensor, ...]:
        """Batch row ``b`` of the core's arrays ``names`` (``getattr(self, name)[b]``), taken once and kept:
        views, no memory. For :meth:`tiles`, called at every fused read, where each ``x[b]`` is a torch
        operation (a few µs of the host on a GPU machine, whose short reads the host issues about as long
        as the device runs them)."""
        kept = self.__dict__.setdefault("_rows_kept", {})
        key = (b, names)
        if key not in kept:
            kept[key] = tuple(getattr(self, name)[b] for name in names)
        return kept[key]


class DenseCore(Core):
    """A core given as an explicit matrix ``(B, C, L, L)``, plus an optional skip ``D`` of shape ``(C,)``.

    For blocks of your own whose mixing you can write down (and for softmax attention probabilities).
    """

    def __init__(self, matrix: Tensor, skip: Tensor | None = None):
        if matrix.dim() != 4 or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(f"DenseCore wants a (batch, channels, L, L) matrix, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.skip = skip
        self.has_skip = skip is not None

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        m = self.matrix[b].index_select(0, chans).index_select(1, rows).index_select(2, cols)
        out = m if ssm else torch.zeros_like(m)
        if skip and self.skip is not None:
            eye = (rows[:, None] == cols[None, :]).to(out.dtype)
            out = out + self.skip.index_select(0, chans)[:, None, None].to(out.dtype) * eye
        return out


@dataclass
class Factors:
    """Everything a view needs, per batch row ``b`` and channel ``c``. Shapes use ``B, C, L, K``.

    Attributes:
        values: ``(B, C, L)`` the ``x`` the matrix acts on.
        core: the :class:`Core` (``R`` and ``D``).
        left: name → ``(B, C, L)`` diagonal factors applied to rows (``"gate"``, ``"norm"``).
        right: name → ``(B, C, L)`` diagonal factors between core and conv (``"act"``).
        conv: ``(C, K)`` causal taps: ``x[j]`` reaches position ``j + k`` with weight ``conv[:, K-1-k]``.
        conv_offset: ``(B, C, L)`` what the conv adds that is not ``conv(input_mask · x)``.
        state_offset: ``(B, C, L)`` an initial recurrent state's contribution, added after the core.
        input_mask: ``(B, L)`` zero where the block zeroed its input (padding).
        mid_mask: ``(B, L)`` zero where the block zeroed positions after the conv (never ablated).
        groups: name → ``(C,)`` integer group of each channel (``"heads"``), for grouped reductions.
    """

    values: Tensor
    core: Core
    left: dict[str, Tensor] = field(default_factory=dict)
    right: dict[str, Tensor] = field(default_factory=dict)
    conv: Tensor | None = None
    conv_offset: Tensor | None = None
    state_offset: Tensor | None = None
    input_mask: Tensor | None = None
    mid_mask: Tensor | None = None
    groups: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.dim() != 3:
            raise ValueError(f"values must be (batch, channels, L), got shape {tuple(self.values.shape)}")
        B, C, L = self.values.shape
        for group in (self.left, self.right):
            for name, t in group.items():
                _expect(t, (B, C, L), name)
        self.left = {name: _row_major(t) for name, t in self.left.items()}
        self.right = {name: _row_major(t) for name, t in self.right.items()}
        for name in ("conv_offset", "state_offset"):
            if getattr(self, name) is not None:
                _expect(getattr(self, name), (B, C, L), name)
        for name in ("input_mask", "mid_mask"):
            if getattr(self, name) is not None:
                _expect(getattr(self, name), (B, L), name)
        for name, g in self.groups.items():
            if g.dim() != 1 or len(g) != C or g.dtype != torch.long:
                raise ValueError(
                    f"group {name!r} must be a (channels={C},) long tensor, got {g.dtype} {tuple(g.shape)}"
                )
        if self.conv is not None and (self.conv.dim() != 2 or self.conv.shape[0] != C):
            raise ValueError(f"conv must be (channels={C}, taps), got shape {tuple(self.conv.shape)}")

    def components(self) -> tuple[str, ...]:
        names = [*self.left, "ssm"]
        if self.core.has_skip:
            names.append("skip")
        names += list(self.right)
        if self.conv is not None:
            names.append("conv")
        return tuple(names)


def _row_major(t: Tensor) -> Tensor:
    """``t`` laid out ``(B, C, L)`` row-major where it is a permuted dense tensor (the transposed
    ``(B, L, C)`` taps most factors come from), so that a fused read takes a run of channels as a view
    instead of copying it on every read. Broadcast views (stride 0) and slices stay as they are. A patcher
    that also keeps the factor (a record's cache of derived tensors) should make it row-major where it is
    computed, as the built-in ones do, or both layouts are kept."""
    if t.is_contiguous():
        return t
    expected = 1  # a permutation of a contiguous layout: strides, smallest first, are running products
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return t
        expected *= size
    return t.contiguous()


def _expect(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


class AttentionView:
    """The implicit attention of one block call, assembled only where it is read.

    Shape ``(batch, channels, L, L)``; ``view[b, c, t, j]`` is how much ``values[b, c, j]`` contributes
    to the block's output at ``(b, c, t)``. Reads:

    * ``view[b, c, rows, cols]`` with ints, slices, index lists (tensors) – computes only that part;
    * :meth:`dense` – the whole ``(B, C, L, L)``;
    * :meth:`mean` / :meth:`sum` – channel reductions ``(B, L, L)``, never holding ``C × L × L``;
    * :meth:`apply` – ``A @ x`` without building ``A``; :attr:`bias`; :meth:`output`.

    Ablations keep the same maths with factors left out: ``view.only("ssm")`` is the S6-only matrix
    of Ali et al.; ``view.without("conv")``, ``"act"``, ``"gate"``, ``"skip"``.

    Example::

        with implicit_hooks.record(model) as rec:
            model(input_ids)
        view = rec[0].attention
        row = view[0, :, -1]                 # (C, L): the last token's row, every channel
        avg = view.mean(absolute=True)       # (B, L, L)
        torch.testing.assert_close(view.output(), rec[0].real_output)
    """

    def __init__(
        self,
        build: Callable[[], Factors],
        *,
        name: str = "",
        grad: bool = False,
        keep: frozenset[str] | None = None,
        tile_elements: int = DEFAULT_TILE_ELEMENTS,
        backend: str = "auto",
        output_dtype: torch.dtype | None = None,
        _cache: dict | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if output_dtype is not None and not output_dtype.is_floating_point:
            raise ValueError(f"the output dtype must be a floating dtype (bfloat16, …), got {output_dtype}")
        self.output_dtype = output_dtype
        self._build = build
        self._cache = _cache if _cache is not None else {}
        self.name = name
        self.grad = grad
        self._keep = keep
        self.tile_elements = int(tile_elements)
        self.backend = backend

    # --- factors and metadata -------------------------------------------------------------------
    @property
    def factors(self) -> Factors:
        """The factors behind the view (computed on first access, then shared by ablations)."""
        if "factors" not in self._cache:
            # a view recorded with grad builds its factors' graph whatever the context of its first read (a
            # first read under no_grad would otherwise leave every later read without a graph)
            with torch.enable_grad() if self.grad else torch.no_grad():
                self._cache["factors"] = self._build()
        return self._cache["factors"]

    @property
    def components(self) -> tuple[str, ...]:
        """Component names of this block, in product order (left to right)."""
        return self.factors.components()

    @property
    def kept(self) -> frozenset[str]:
        """The components this view multiplies (all of them unless ablated)."""
        return frozenset(self.components) if self._keep is None else self._keep

    @property
    def shape(self) -> torch.Size:
        B, C, L = self.factors.values.shape
        return torch.Size((B, C, L, L))

    @property
    def dtype(self) -> torch.dtype:
        return self.factors.values.dtype

    @property
    def device(self) -> torch.device:
        return self.factors.values.device

    def __repr__(self) -> str:
        ablated = "" if self._keep is None else f", only={sorted(self._keep)}"
        if "factors" not in self._cache:
            return f"AttentionView({self.name!r}, not built yet{ablated})"
        return f"AttentionView({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}{ablated})"

    def _grad_mode(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.grad else torch.no_grad()

    def _derive(self, keep: frozenset[str] | None, **changes: Any) -> AttentionView:
        """The same factors (shared, computed once) with ``keep`` and any of the settings ``changes``."""
        settings = dict(name=self.name, grad=self.grad, tile_elements=self.tile_elements,
                        backend=self.backend, output_dtype=self.output_dtype)  # fmt: skip
        return AttentionView(self._build, keep=keep, _cache=self._cache, **{**settings, **changes})

    # --- ablations ------------------------------------------------------------------------------
    def _check_names(self, names: tuple[str, ...]) -> None:
        unknown = [n for n in names if n not in self.components]
        if unknown:
            raise ValueError(
                f"{self.name or 'this block'} has no component {unknown}; its components are "
                f"{list(self.components)}"
            )

    def only(self, *names: str) -> AttentionView:
        """The matrix with only the named components (``only("ssm")``: the S6-only matrix)."""
        self._check_names(names)
        return self._derive(frozenset(names))

    def without(self, *names: str) -> AttentionView:
        """The matrix with the named components left out (treated as identity)."""
        self._check_names(names)
        return self._derive(self.kept - set(names))

    def with_backend(self, backend: str) -> AttentionView:
        """The same view assembled by ``backend``: ``"auto"`` (the fused Triton kernel where the core has
        one, the device is CUDA and the view is float32 without autograd; torch elsewhere), ``"torch"``
        or ``"triton"`` (an error where the kernel cannot serve)."""
        return self._derive(self._keep, backend=backend)

    def with_output_dtype(self, dtype: torch.dtype | None) -> AttentionView:
        """The same view whose entries (``view[...]``, :meth:`dense`) are stored in ``dtype``, e.g.
        ``torch.bfloat16``: computed in the view's dtype as always and rounded once, as they are written,
        so a dense read takes half the memory (about the same time: the kernels are bound by their
        arithmetic, not by the writes). ``None``: the view's dtype.
        Reductions and products (:meth:`mean`, :meth:`apply`, …) keep the view's dtype."""
        return self._derive(self._keep, output_dtype=dtype)

    @property
    def _out_dtype(self) -> torch.dtype:
        return self.output_dtype or self.dtype

    def with_tiles(self, tile_elements: int) -> AttentionView:
        """The same view computed with tiles of at most ``tile_elements`` temporary elements."""
        return self._derive(self._keep, tile_elements=tile_elements)

    # --- the entries ----------------------------------------------------------------------------
    def _block(
        self,
        b: int,
        chans: Tensor,
        rows: Tensor,
        cols: Tensor,
        span: tuple[int, int] | None = None,
        *,
        left: bool = True,
        conv: bool = True,
        input_mask: bool = True,
    ) -> Tensor:
        """Entries ``[b, chans, rows, cols]`` of the (possibly ablated) product; ``span`` is ``(c0, c1)``
        where the caller knows on the host that ``cols`` is that range (ranges take plain slices: the conv,
        and the core's :meth:`Core.block_range`)."""
        f, keep = self.factors, self.kept
        L = f.values.shape[-1]
        use_conv = conv and f.conv is not None and "conv" in keep
        core_span = span
        if use_conv:
            K = f.conv.shape[1]
            # x[j] reaches the conv outputs j, …, j+K-1: the core is needed at those columns.
            if span is not None:
                core_span = (span[0], min(span[1] + K - 1, L))
                core_cols = torch.arange(*core_span, device=cols.device)
            else:
                shifted = cols[None, :] + torch.arange(K, device=cols.device)[:, None]  # (K, ncol)
                valid = shifted < L
                core_cols, where = torch.unique(shifted.clamp(max=L - 1), return_inverse=True)
        else:
            core_cols = cols
        ssm, skip = "ssm" in keep, "skip" in keep
        if core_span is not None:
            core = f.core.block_range(b, chans, rows, *core_span, ssm=ssm, skip=skip)
        else:
            core = f.core.block(b, chans, rows, core_cols, ssm=ssm, skip=skip)
        right = self._diagonal(f.right, b, chans, extra=f.mid_mask)
        if right is not None:
            core = core * right.index_select(1, core_cols)[:, None, :]
        if use_conv:
            taps = f.conv.index_select(0, chans).to(core.dtype)  # (nc, K)
            if span is not None:  # past the end of the sequence the conv reads nothing
                core = torch.nn.functional.pad(core, (0, span[1] + K - 1 - span[0] - core.shape[-1]))
            out = None
            for k in range(K):  # K is the conv width (about 4), not the sequence length
                if span is not None:
                    term = core[:, :, k : k + len(cols)] * taps[:, K - 1 - k, None, None]
                else:
                    weight = taps[:, K - 1 - k, None] * valid[k].to(core.dtype)[None, :]  # (nc, ncol)
                    term = core.index_select(2, where[k]) * weight[:, None, :]
                out = term if out is None else out + term
        else:
            out = core
        if input_mask and f.input_mask is not None:
            out = out * f.input_mask[b].index_select(0, cols).to(out.dtype)[None, None, :]
        if left:
            gate = self._diagonal(f.left, b, chans)
            if gate is not None:
                out = out * gate.index_select(1, rows)[:, :, None]
        return out

    def _diagonal(self, group: dict[str, Tensor], b: int, chans: Tensor | slice, extra: Tensor | None = None):
        """Product of the kept diagonal factors of ``group`` for batch row ``b``: ``(nc, L)`` or None.

        Where that takes a multiplication (two factors or more, or ``extra``), the product of every channel
        of the batch row is kept with the factors until a read of another row replaces it (``(C, L)``: one
        batch row of one factor): every read of a row would otherwise launch the same elementwise product,
        and on a GPU machine each torch operation costs the host 10–25 µs of a read. A single factor's row
        is kept the same way (a view: no memory; not in a view recorded with ``grad``, whose factors have a
        graph), so a read of a kept row runs no torch operation here. A read that builds an autograd graph
        multiplies only its channels and keeps nothing (nor takes what a read without a graph kept)."""
        kept = self.kept  # a property that builds a set: once, not per factor
        names = tuple(name for name in group if name in kept)
        if not names and extra is None:
            return None
        graph = self.grad and torch.is_grad_enabled()
        key = ("diagonal", id(group), names, extra is not None)
        row, out = self._cache.get(key, (None, None))
        if graph or row != b:  # the factors' rows taken (a torch operation each) only where none is kept
            parts = [group[name][b] for name in names]
            mask = None if extra is None else extra[b].to(self.dtype)[None, :]
            if graph:  # a graph per read, of its channels only: nothing kept, nothing taken from the kept
                return _product([take(part, chans) for part in parts], mask, count(chans))
            out = _product(parts, mask, self.shape[1])  # one factor: its row, a view
            if not (self.grad and len(parts) == 1 and mask is None):  # nor a lone factor that has a graph
                self._cache[key] = (b, out)
        return take(out, chans)

    def _tiles(self, n_chans: int, n_rows: int, n_cols: int) -> tuple[int, int]:
        """Channel and row tile sizes whose temporary work fits in ``tile_elements``."""
        K = self.factors.conv.shape[1] if self.factors.conv is not None else 1
        per_row = max(1, min(n_cols * K, self.shape[-1]) * self.factors.core.work_per_entry)
        per_chan = per_row * max(1, n_rows)
        if per_chan <= self.tile_elements:
            return max(1, min(n_chans, self.tile_elements // per_chan)), max(1, n_rows)
        return 1, max(1, self.tile_elements // per_row)

    # --- the fused path -------------------------------------------------------------------------
    def _fused(self, rows: _Axis, cols: _Axis) -> tuple[int, int, int, int] | None:
        """``(r0, r1, c0, c1)`` when the fused kernel serves this read, else None (torch path)."""
        if self.backend == "torch" or (self.backend == "auto" and self.device.type != "cuda"):
            return None  # and on CPU, not even an import of Triton on every read
        from . import kernels

        rspan, cspan = rows.span, cols.span
        why = None
        if self.dtype != torch.float32:
            why = f"it assembles float32 views, this one is {self.dtype}"
        elif self.grad and torch.is_grad_enabled():
            why = "it has no autograd (the view was recorded with grad=True)"
        elif not kernels.available(self.device, interpreted=self.backend == "triton"):
            why = f"Triton is not installed or the device is {self.device} (CUDA needed)"
        elif rspan is None or cspan is None:
            why = "it reads contiguous ranges of rows and columns (slices)"
        elif type(self.factors.core).tiles is Core.tiles:
            why = f"{type(self.factors.core).__name__} has no fused kernel"
        if why is None and self.backend == "auto":
            # a few rows: the kernel computes whole 64-row tiles, the torch path only those rows
            core = self.factors.core
            if not core.fused_by_default or (rspan[1] - rspan[0] < FUSED_MIN_ROWS and not core.fused_rows):
                return None
        if why is None:
            return (*rspan, *cspan)
        if self.backend == "triton":
            raise ValueError(f"backend='triton' cannot serve this read: {why}")
        return None

    def _fused_tiles(self, b: int, chans: Tensor | slice) -> Any:
        f, keep = self.factors, self.kept
        return f.core.tiles(
            b,
            chans,
            left=self._diagonal(f.left, b, chans),
            right=self._diagonal(f.right, b, chans, extra=f.mid_mask),
            taps=take(f.conv, chans) if f.conv is not None and "conv" in keep else None,
            input_mask=None if f.input_mask is None else f.input_mask[b],
            ssm="ssm" in keep,
            skip="skip" in keep,
        )

    def _fused_chunks(self) -> int:
        """Channels whose kernel preparation (``fused_work · L`` elements each) fits the budget."""
        return max(1, FUSED_PREP_ELEMENTS // (self.factors.core.fused_work * self.shape[-1]))

    def _fused_parts(self, cs: _Axis):
        """The channels of one :meth:`Core.tiles` call at a time, chunk by chunk (the preparation budget)
        and part by part (the core's): ``(chans, pos, run)``, ``pos`` their positions in ``cs`` on the
        device, ``run`` the same as ``(start, stop)`` where they are one run (known on the host). A run of
        channel ids goes as a ``slice`` (no gathers), a list as their ids on the device."""
        step = self._fused_chunks()
        for c0 in range(0, len(cs), step):
            c1 = min(c0 + step, len(cs))
            chans = cs.index[c0:c1] if cs.span is None else slice(cs.span[0] + c0, cs.span[0] + c1)
            parts = self.factors.core.tile_parts(chans)
            if parts is None:
                yield chans, None, (c0, c1)
                continue
            ids = cs.index[c0:c1]
            for part in parts:
                yield ids[part], part + c0, None

    def _channel_ids(self, chans: Tensor | slice) -> Tensor:
        """``chans`` as channel ids on the device (a run made into one)."""
        if isinstance(chans, slice):
            return torch.arange(chans.start, chans.stop, device=self.device)
        return chans

    def _no_kernel(self, b: int, chans: Tensor | slice) -> None:
        """The core declined these channels: the torch path serves them, unless Triton was asked for."""
        if self.backend == "triton":
            raise ValueError(
                f"backend='triton' cannot serve this read: {type(self.factors.core).__name__} has no kernel "
                f"for channels {self._channel_ids(chans).tolist()[:4]}… of batch row {b} (see its tiles())"
            )

    def _compute(self, bs: _Axis, cs: _Axis, rows: _Axis, cols: _Axis) -> Tensor:
        span = self._fused(rows, cols)
        if span is None:
            return self._compute_torch(bs.values(), cs.index, rows.index, cols)
        out = torch.empty(len(bs), len(cs), len(rows), len(cols), dtype=self._out_dtype, device=self.device)
        for i, b in enumerate(bs.values()):
            for chans, pos, run in self._fused_parts(cs):
                tiles = self._fused_tiles(b, chans)
                if tiles is not None and run is not None:  # one run of channels: written in place
                    tiles.dense(*span, out=out[i, run[0] : run[1]])
                    continue
                if tiles is None:
                    self._no_kernel(b, chans)
                    part = self._compute_torch([b], self._channel_ids(chans), rows.index, cols)[0]
                else:
                    part = tiles.dense(*span)
                if run is not None:
                    out[i, run[0] : run[1]] = part
                else:
                    out[i].index_copy_(0, pos, part)
        return out

    def _compute_torch(self, bs: list[int], cs: Tensor, rows: Tensor, cols: _Axis) -> Tensor:
        out = torch.zeros(len(bs), len(cs), len(rows), len(cols), dtype=self._out_dtype, device=self.device)
        ct, rt = self._tiles(len(cs), len(rows), len(cols))
        for i, b in enumerate(bs):
            for c0 in range(0, len(cs), ct):
                for r0 in range(0, len(rows), rt):
                    out[i, c0 : c0 + ct, r0 : r0 + rt] = self._block(
                        b, cs[c0 : c0 + ct], rows[r0 : r0 + rt], cols.index, cols.span
                    )
        return out

    def __getitem__(self, key: Any) -> Tensor:
        index = _parse_key(key, self.shape, self.device)
        with self._grad_mode():
            out = self._compute(*index)
        squeeze = [d for d, axis in enumerate(index) if axis.scalar]
        for d in reversed(squeeze):
            out = out.squeeze(d)
        return out

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole matrix, ``(B, C, L, L)``; ``dtype`` (e.g. ``torch.bfloat16``) stores it in that dtype
        (:meth:`with_output_dtype`)."""
        return (self if dtype is None else self.with_output_dtype(dtype))[:, :, :, :]

    def reduce(
        self,
        op: str = "mean",
        *,
        absolute: bool = False,
        transform: str = "signed",
        row_weight: Tensor | None = None,
        col_weight: Tensor | None = None,
        by: str | Tensor | None = None,
        batch: Any = slice(None),
        rows: Any = slice(None),
        cols: Any = slice(None),
        channels: Any = slice(None),
    ) -> Tensor:
        """Channel ``"mean"`` or ``"sum"`` of the matrix, tile by tile.

        Each entry ``A[b, c, t, j]`` is first multiplied by ``row_weight[b, c, t]`` and
        ``col_weight[b, c, j]`` (each ``(B, C, L)``, optional), then transformed: ``"signed"`` (as is),
        ``"abs"`` (``absolute=True`` is the same) or ``"positive"`` (clamped at 0). With
        ``row_weight = ∂T/∂y`` and ``col_weight = x`` the entries are ``∇_A T ⊙ A`` (Chefer-style).

        Returns ``(B, rows, cols)``; with ``by`` (a group name such as ``"heads"``, see
        :attr:`groups`, or a ``(C,)`` integer tensor) one reduction per group: ``(B, G, rows, cols)``.
        """
        if op not in ("mean", "sum"):
            raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
        transform = "abs" if absolute else transform
        if transform not in ("signed", "abs", "positive"):
            raise ValueError(f"transform must be 'signed', 'abs' or 'positive', got {transform!r}")
        for name, w in (("row_weight", row_weight), ("col_weight", col_weight)):
            if w is not None and tuple(w.shape) != tuple(self.factors.values.shape):
                raise ValueError(f"{name} must have shape (B, C, L) = {tuple(self.factors.values.shape)}")
        B, C, L, _ = self.shape
        keys = ((batch, B, "batch"), (channels, C, "channels"), (rows, L, "rows"), (cols, L, "cols"))
        batch_axis, chan_axis, row_axis, col_axis = (_parse_index(*key, self.device) for key in keys)
        span = self._fused(row_axis, col_axis) if by is None else None
        B = len(batch_axis)
        if span is not None:
            out = torch.zeros(B, len(row_axis), len(col_axis), dtype=self.dtype, device=self.device)
            for i, b in enumerate(batch_axis.values()):
                for chans, _, _ in self._fused_parts(chan_axis):
                    tiles = self._fused_tiles(b, chans)
                    if tiles is None:
                        self._no_kernel(b, chans)
                        out[i] += self.with_backend("torch").reduce(
                            "sum", transform=transform, row_weight=row_weight, col_weight=col_weight,
                            batch=[b], rows=rows, cols=cols, channels=chans,  # a run or ids: both index
                        )[0]  # fmt: skip
                        continue
                    out[i] += tiles.reduce(
                        *span,
                        row_weight=None if row_weight is None else take(row_weight[b], chans),
                        col_weight=None if col_weight is None else take(col_weight[b], chans),
                        transform=transform,
                    )
            return out / len(chan_axis) if op == "mean" else out
        cs, rs, js = chan_axis.index, row_axis.index, col_axis.index
        group = self._group_index(by)
        n_groups = 1 if group is None else int(group.max()) + 1
        member = torch.zeros(len(cs), dtype=torch.long, device=self.device) if group is None else group[cs]
        with self._grad_mode():
            out = torch.zeros(B, n_groups, len(rs), len(js), dtype=self.dtype, device=self.device)
            ct, rt = self._tiles(len(cs), len(rs), len(js))
            for i, b in enumerate(batch_axis.values()):
                for c0 in range(0, len(cs), ct):
                    for r0 in range(0, len(rs), rt):
                        chans, rows_ = cs[c0 : c0 + ct], rs[r0 : r0 + rt]
                        part = self._block(b, chans, rows_, js, col_axis.span)
                        if row_weight is not None:
                            part = part * row_weight[b].to(part.dtype)[chans][:, rows_, None]
                        if col_weight is not None:
                            part = part * col_weight[b].to(part.dtype)[chans][:, None, js]
                        if transform == "abs":
                            part = part.abs()
                        elif transform == "positive":
                            part = part.clamp_min(0)
                        summed = torch.zeros_like(out[i, :, r0 : r0 + rt]).index_add(
                            0, member[c0 : c0 + ct], part
                        )
                        out[i, :, r0 : r0 + rt] = out[i, :, r0 : r0 + rt] + summed
            if op == "mean":
                counts = torch.bincount(member, minlength=n_groups).clamp_min(1).to(self.dtype)
                out = out / counts[None, :, None, None]
            return out[:, 0] if group is None else out

    @property
    def groups(self) -> dict[str, Tensor]:
        """Named channel groupings of this block (``"heads"`` → ``(C,)`` head of each channel)."""
        return self.factors.groups

    def _group_index(self, by: str | Tensor | None) -> Tensor | None:
        if by is None:
            return None
        if isinstance(by, str):
            if by not in self.groups:
                raise ValueError(
                    f"{self.name or 'this block'} has no channel grouping {by!r}; it has {list(self.groups)}"
                )
            return self.groups[by].to(self.device)
        by = torch.as_tensor(by, device=self.device)
        if by.shape != (self.shape[1],) or by.is_floating_point() or by.min() < 0:
            raise ValueError(f"by must be a group name or a ({self.shape[1]},) tensor of non-negative ints")
        return by.long()

    def mean(self, *, absolute: bool = False, **options: Any) -> Tensor:
        """Channel mean ``(B, L, L)`` (of ``|A|`` if ``absolute``); options as in :meth:`reduce`."""
        return self.reduce("mean", absolute=absolute, **options)

    def sum(self, *, absolute: bool = False, **options: Any) -> Tensor:
        """Channel sum ``(B, L, L)``; see :meth:`mean`."""
        return self.reduce("sum", absolute=absolute, **options)

    # --- products with vectors ------------------------------------------------------------------
    def _matvec(self, x: Tensor, *, fast: bool = True, **parts: bool) -> Tensor:
        """``(A_parts @ x)`` for ``x`` of shape ``(B, C, L)``.

        Factor by factor (``O(L)`` per channel) when the core offers ``matvec``; otherwise (or with
        ``fast=False``, the readable twin) row tile by row tile over the causal columns.
        """
        if fast and hasattr(self.factors.core, "matvec"):
            return self._matvec_factored(x, **parts)
        B, C, L, _ = self.shape
        out = torch.zeros(B, C, L, dtype=self.dtype, device=self.device)
        x = x.to(self.dtype)
        positions = torch.arange(L, device=self.device)
        channels = torch.arange(C, device=self.device)
        ct, rt = self._tiles(C, L, L)
        for b in range(B):
            for c0 in range(0, C, ct):
                chans = channels[c0 : c0 + ct]
                for r0 in range(0, L, rt):
                    rows = positions[r0 : r0 + rt]
                    cols = positions[: r0 + len(rows)]  # A is causal: columns past the last row are zero
                    blk = self._block(b, chans, rows, cols, (0, len(cols)), **parts)
                    out[b, c0 : c0 + ct, r0 : r0 + rt] = torch.einsum(
                        "crj,cj->cr", blk, x[b, c0 : c0 + ct, : len(cols)]
                    )
        return out

    def _matvec_factored(
        self, x: Tensor, *, left: bool = True, conv: bool = True, input_mask: bool = True
    ) -> Tensor:
        """``left · core · right · conv · input_mask`` applied to ``x``, one factor after the other."""
        f, keep = self.factors, self.kept
        B, C, L, _ = self.shape
        channels = torch.arange(C, device=self.device)
        out = []
        for b in range(B):
            s = x[b].to(self.dtype)  # (C, L)
            if input_mask and f.input_mask is not None:
                s = s * f.input_mask[b].to(s.dtype)
            if conv and f.conv is not None and "conv" in keep:
                K = f.conv.shape[1]
                s = torch.nn.functional.conv1d(
                    torch.nn.functional.pad(s[None], (K - 1, 0)), f.conv.to(s.dtype)[:, None, :], groups=C
                )[0]
            right = self._diagonal(f.right, b, channels, extra=f.mid_mask)
            if right is not None:
                s = s * right
            y = f.core.matvec(b, s, ssm="ssm" in keep, skip="skip" in keep)
            gate = self._diagonal(f.left, b, channels) if left else None
            out.append(y if gate is None else y * gate)
        return torch.stack(out)

    def apply(self, x: Tensor) -> Tensor:
        """``A @ x`` per channel for ``x`` of shape ``(B, C, L)``, without building ``A``."""
        if tuple(x.shape) != tuple(self.factors.values.shape):
            raise ValueError(
                f"apply(x) wants x of shape (batch, channels, L) = {tuple(self.factors.values.shape)}, "
                f"got {tuple(x.shape)}"
            )
        with self._grad_mode():
            return self._matvec(x)

    @property
    def values(self) -> Tensor:
        """The ``x`` the matrix acts on, ``(B, C, L)``."""
        return self.factors.values

    @property
    def bias(self) -> Tensor:
        """``(B, C, L)``: the part of the output that does not come from ``values``.

        ``left · (core · right · conv_offset + state_offset)``; ablated factors are left out of it too.
        """
        f, keep = self.factors, self.kept
        with self._grad_mode():
            out = torch.zeros_like(f.values)
            if f.conv_offset is not None and "conv" in keep:
                out = self._matvec(f.conv_offset, left=False, conv=False, input_mask=False)
            if f.state_offset is not None and "ssm" in keep:
                out = out + f.state_offset.to(out.dtype)
            for name, t in f.left.items():
                if name in keep:
                    out = out * t
            return out

    def output(self) -> Tensor:
        """``A @ values + bias``: the block's output before its output projection, ``(B, C, L)``."""
        return self.apply(self.values) + self.bias


class _Axis:
    """One parsed index: ``host`` on the CPU, ``span`` as ``(start, stop)`` where it is one increasing run,
    ``scalar`` when it was an int (dropped from the result), and ``index``, the same on the view's device.
    Both are made on first use where a run describes them (a fused read of whole ranges needs neither for
    its rows, columns or channels). Parsed on the host, so that deciding how to serve a read never waits
    for the device."""

    def __init__(self, host: Tensor | None, span: tuple[int, int] | None, scalar: bool, device: torch.device):
        if host is None and span is None:
            raise ValueError("an axis is a run (span) or a list of indices (host)")
        self._host, self.span, self.scalar, self.device = host, span, scalar, device
        self._index: Tensor | None = None

    @property
    def host(self) -> Tensor:
        if self._host is None:
            self._host = torch.arange(*self.span)
        return self._host

    @property
    def index(self) -> Tensor:
        if self._index is None:  # a run is made where it is needed; a list is copied once
            if self.span is not None:
                self._index = torch.arange(*self.span, device=self.device)
            else:
                self._index = self.host.to(self.device, non_blocking=True)
        return self._index

    def values(self) -> list[int]:
        """The indices as Python ints (batch rows, looped over on the host)."""
        return list(range(*self.span)) if self._host is None else self._host.tolist()

    def __len__(self) -> int:
        return self.span[1] - self.span[0] if self._host is None else len(self._host)


def _span(index: Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` when the CPU tensor ``index`` is ``start, start + 1, …, stop − 1`` (non-empty)."""
    if len(index) == 0:
        return None
    start, stop = int(index[0]), int(index[-1]) + 1
    if stop - start != len(index):
        return None
    if len(index) > 1 and not bool((index[1:] - index[:-1] == 1).all()):
        return None
    return start, stop


def _parse_index(index: Any, size: int, axis: str, device: torch.device) -> _Axis:
    """An int, slice, list or 1-D tensor (integer or boolean) as an :class:`_Axis`."""
    if isinstance(index, bool):
        raise TypeError(f"{axis}: a bool is not an index")
    scalar = isinstance(index, int) or (isinstance(index, Tensor) and index.dim() == 0)
    if scalar:
        i = int(index)
        if not -size <= i < size:
            raise IndexError(f"{axis} index {i} is out of range for size {size}")
        return _Axis(None, (i % size, i % size + 1), True, device)
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if step == 1 and stop > start:  # a run: no index tensor unless one is asked for
            return _Axis(None, (start, stop), False, device)
        t = torch.arange(start, stop, step)
        return _Axis(t, _span(t), False, device)
    t = torch.as_tensor(index).cpu()  # a device tensor is read once, here
    if t.dim() != 1:
        raise IndexError(f"{axis}: index lists must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        if len(t) != size:
            raise IndexError(f"{axis}: boolean mask of length {len(t)} for size {size}")
        t = t.nonzero().flatten()
    elif t.is_floating_point():
        raise TypeError(f"{axis}: indices must be integers, got {t.dtype}")
    else:
        t = t.long()
        if len(t) and (t.min() < -size or t.max() >= size):
            raise IndexError(f"{axis}: indices {t.tolist()} out of range for size {size}")
        t = t % size
    return _Axis(t, _span(t), False, device)


_AXES = ("batch", "channels", "rows", "cols")


def _parse_key(key: Any, shape: torch.Size, device: torch.device) -> list[_Axis]:
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (4 - len(key) + 1) + key[at + 1 :]
    if len(key) > 4:
        raise IndexError(f"a view has 4 axes {_AXES}, got {len(key)} indices")
    key = key + (slice(None),) * (4 - len(key))
    return [_parse_index(k, n, axis, device) for k, n, axis in zip(key, shape, _AXES)]
