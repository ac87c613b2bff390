"""``record(model)``: hooks on every supported block, and the records of their calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import RecordingError, UnsupportedModelError
from .registry import patcher_class_for, supported_classes

if TYPE_CHECKING:
    from .patcher import Patcher
    from .view import AttentionView, Factors


class LazyTensors(Mapping):
    """A read-only mapping whose values are computed on first access, then kept."""

    def __init__(self, thunks: Mapping[str, Any]):
        self._thunks = thunks
        self._values: dict[str, torch.Tensor] = {}

    def _compute(self, key: str) -> torch.Tensor:
        return self._thunks[key]()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._values:
            if key not in self._thunks:
                raise KeyError(f"{key!r}: this record has {sorted(self._thunks)}")
            self._values[key] = self._compute(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(self._thunks)})"


class DetachedWeights(LazyTensors):
    """Weights read detached, each detached once, on first access: one object a block at set-up, where a
    mapping of ``w.detach`` thunks made seven."""

    def _compute(self, key: str) -> torch.Tensor:
        return self._thunks[key].detach()


def kept_weights(weights: Mapping[str, torch.Tensor], grad: bool) -> Mapping[str, torch.Tensor]:
    """A call's weights as its record keeps them: as they are when recorded with grad, else detached when a
    view first reads them (not at every call: a hook runs on every forward)."""
    if grad:
        return dict(weights)
    return DetachedWeights(weights)


class BlockRecord:
    """One call of one supported block.

    Attributes:
        name: the block's module path, e.g. ``"backbone.layers.3.mixer"``.
        kind: the block family, e.g. ``"mamba"`` (``"attention"`` for softmax layers).
        raw: what the hooks captured, untouched (references, detached unless recorded with grad).
        status: ``"open"`` during the call, then ``"complete"``, ``"failed"`` or ``"freed"``.
    """

    def __init__(self, name: str, kind: str, patcher: Patcher, *, grad: bool = False):
        self.name = name
        self.kind = kind
        self.patcher = patcher
        self.grad = grad
        self.raw: dict[str, Any] = {}
        self.weights: Mapping[str, torch.Tensor] = {}
        self.weight_versions: dict[str, int] = {}
        self.status = "open"
        #: scratch space for patchers (derived tensors per dtype); cleared by :meth:`free`.
        self.cache: dict = {}
        self._views: dict[torch.dtype, AttentionView] = {}
        self._tensors: dict[torch.dtype, LazyTensors] = {}

    def __repr__(self) -> str:
        return f"BlockRecord(name={self.name!r}, kind={self.kind!r}, status={self.status!r})"

    # --- access ---------------------------------------------------------------------------------
    def _check_readable(self) -> None:
        if self.status == "freed":
            raise RecordingError(f"{self.name}: this record's tensors were freed; record the model again")
        if self.status != "complete":
            raise RecordingError(
                f"{self.name}: the block's call did not finish (status {self.status!r}), so its record is "
                "incomplete; run the forward to the end inside `record(...)`"
            )
        for key, version in self.weight_versions.items():
            if self.weights[key]._version != version:
                raise RecordingError(
                    f"{self.name}: weight {key!r} changed in place after this call was recorded "
                    "(an optimiser step?); the view would not explain that call. Record again."
                )

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """The factors of this call in ``dtype`` (computed from the recorded tensors and weights)."""
        self._check_readable()
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            return self.patcher.factors(self, dtype)

    def view(self, dtype: torch.dtype = torch.float32) -> AttentionView:
        """The lazy implicit attention of this call, assembled in ``dtype`` (float32 or float64)."""
        from .view import AttentionView

        if dtype not in self._views:
            self._check_readable()
            self._views[dtype] = AttentionView(
                lambda d=dtype: self.factors(d), name=self.name, grad=self.grad
            )
        return self._views[dtype]

    @property
    def attention(self) -> AttentionView:
        """The lazy implicit attention of this call (float32). See :class:`AttentionView`."""
        return self.view(torch.float32)

    @property
    def tensors(self) -> LazyTensors:
        """Named tensors of the call (``"decay"``, ``"gate"``, ``"input_proj"``, family-specific ones)."""
        dtype = torch.float32
        if dtype not in self._tensors:
            self._check_readable()
            thunks = self.patcher.tensors(self, dtype)
            self._tensors[dtype] = LazyTensors(thunks)
        return self._tensors[dtype]

    @property
    def real_output(self) -> torch.Tensor | None:
        """The block's real output before its output projection, ``(B, C, L)``, when it was observable."""
        self._check_readable()
        return self.patcher.real_output(self)

    def output_error(self, dtype: torch.dtype = torch.float32) -> float:
        """``‖A·x + bias − y‖ / ‖y‖`` against the block's real output ``y`` (Frobenius norms)."""
        real = self.real_output
        if real is None:
            raise RecordingError(
                f"{self.name}: the block's output before its output projection was not observable on this "
                "code path (a fused kernel?), so exactness cannot be checked here"
            )
        ours = self.view(dtype).output()
        real = real.to(ours.dtype)
        return float(torch.linalg.vector_norm(ours - real) / torch.linalg.vector_norm(real).clamp_min(1e-30))

    def free(self) -> None:
        """Drop the recorded tensors; later reads raise a clear error."""
        self.raw.clear()
        self.cache.clear()
        self._views.clear()
        self._tensors.clear()
        self.status = "freed"


class Recording(Sequence):
    """The :class:`BlockRecord` s of one ``record(...)`` context, in call order.

    ``rec[i]`` is the i-th call, ``rec["backbone.layers.3.mixer"]`` the call of that module (when it ran
    more than once, e.g. during generation, use :meth:`calls`).
    """

    def __init__(self) -> None:
        self._records: list[BlockRecord] = []
        self.blocks: list[str] = []

    def _append(self, record: BlockRecord) -> None:
        self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[BlockRecord]:
        return iter(self._records)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            calls = self.calls(key)
            if not calls:
                known = ", ".join(self.blocks[:6]) + (", …" if len(self.blocks) > 6 else "")
                raise KeyError(f"no call of {key!r} was recorded; recorded blocks: {known or 'none'}")
            if len(calls) > 1:
                raise KeyError(
                    f"{key!r} was called {len(calls)} times (generation?); use rec.calls({key!r})[i]"
                )
            return calls[0]
        return self._records[key]

    def calls(self, name: str) -> list[BlockRecord]:
        """Every recorded call of the block ``name``, in order."""
        return [r for r in self._records if r.name == name]

    def names(self) -> list[str]:
        """Block names in call order (with repeats for blocks called more than once)."""
        return [r.name for r in self._records]

    def free(self) -> None:
        """Drop every recorded tensor (views read afterwards raise :class:`RecordingError`)."""
        for r in self._records:
            r.free()

    def clear(self) -> None:
        """Free every record and forget it; the context stays open and the next call is ``rec[0]`` again.

        For a loop over inputs inside one ``record``: the hooks are attached once (entering ``record`` costs
        as much as a forward's hooks), and only the current input's tensors are kept::

            with implicit_hooks.record(model) as rec:
                for ids in batches:
                    model(ids)
                    rows.append([r.attention[0, :, -1] for r in rec])
                    rec.clear()
        """
        self.free()
        self._records.clear()

    def __repr__(self) -> str:
        return f"Recording({len(self)} calls of {len(set(self.names()))} blocks)"


class Replacements:
    """Counts the parameters, buffers and sub-modules registered on any module while it is on (torch's global
    registration hooks; ``remove()`` takes them off): assigning ``mixer.A_log = nn.Parameter(...)``, or
    ``load_state_dict(..., assign=True)``, between two forwards of one ``record`` context. The patchers look
    their weights up again at their next call (:meth:`Patcher.attach`), so a record never keeps the weights
    of an earlier call. In-place changes need no lookup: each call keeps the versions it saw.

    The hook goes straight into torch's three dictionaries of global registration hooks, under a key of its
    own (:class:`~implicit_hooks.patcher.Hooks` says why: the handles were a fifth of entering ``record``)."""

    _next = [-1]  # keys count down from -1: torch's count up from 0

    def __init__(self) -> None:
        self.count = [0]  # a list: the hooks read it from a closure cell
        count = self.count

        def registered(module: nn.Module, name: str, value: Any) -> None:
            count[0] += 1

        self._key = key = Replacements._next[0]
        Replacements._next[0] = key - 1
        for hooks in _REGISTRATION_HOOKS:
            hooks[key] = registered

    def remove(self) -> None:
        for hooks in _REGISTRATION_HOOKS:
            hooks.pop(self._key, None)


#: torch's global hooks on the registration of a parameter, a buffer or a sub-module (torch ≥ 2.0)
_REGISTRATION_HOOKS = (
    nn.modules.module._global_parameter_registration_hooks,
    nn.modules.module._global_buffer_registration_hooks,
    nn.modules.module._global_module_registration_hooks,
)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, type[Patcher]]]:
    """Every sub-module of ``model`` with a registered patcher: ``(name, module, patcher_class)``, in the
    order and under the names of ``model.named_modules()``.

    The walk does not go below a block whose patcher says it holds no other block
    (:attr:`Patcher.holds_blocks`, false for every built-in family): a 24-layer Mamba-2's mixers hold 120 of
    its 199 modules, and finding its blocks takes 33 µs instead of 80 on the 2-core development machine
    (entering and leaving ``record``: 218–236 µs instead of 265)."""
    if type(model).named_modules is not nn.Module.named_modules:  # a class that walks itself is asked
        named = ((name, m, patcher_class_for(m)) for name, m in model.named_modules())
        return [block for block in named if block[2] is not None]
    found, by_type, seen = [], {}, set()  # a model repeats a few module types many times: a lookup a type
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        kind = type(module)
        cls = by_type.get(kind, False)
        if cls is False:
            cls = by_type[kind] = patcher_class_for(module)
        if cls is not None:
            found.append((name, module, cls))
            if not cls.holds_blocks:
                continue
        if module._modules:
            prefix = name + "." if name else ""
            stack.extend([(prefix + k, m) for k, m in reversed(module._modules.items()) if m is not None])
    return found


def _select(blocks: list, layers: Sequence[int | str] | Callable[[str], bool] | None) -> list:
    if layers is None:
        return blocks
    if callable(layers):
        return [b for b in blocks if layers(b[0])]
    names = [b[0] for b in blocks]
    chosen = set()
    for item in layers:
        if isinstance(item, int):
            if not -len(blocks) <= item < len(blocks):
                raise IndexError(f"layers: index {item} out of range for {len(blocks)} supported blocks")
            chosen.add(item % len(blocks))
        elif item in names:
            chosen.add(names.index(item))
        else:
            raise KeyError(f"layers: {item!r} is not a supported block; supported blocks: {names}")
    return [b for i, b in enumerate(blocks) if i in chosen]


def attach_blocks(blocks: list, recording: Recording, patchers: list, handles: list, *, grad: bool) -> None:
    """Attach every block's hooks into ``recording``, filling ``patchers`` and ``handles`` as it goes (the
    caller removes the handles and closes the patchers, also when this raises), with one
    :class:`Replacements` watch for them all."""
    recording.blocks = [name for name, _, _ in blocks]
    handles.append(replacements := Replacements())
    for name, module, cls in blocks:
        patcher = cls(module, name)
        patchers.append(patcher)
        handles.extend(patcher.attach(recording._append, grad=grad, replacements=replacements))


@contextlib.contextmanager
def record(
    model: nn.Module,
    *,
    layers: Sequence[int | str] | Callable[[str], bool] | None = None,
    grad: bool = False,
) -> Iterator[Recording]:
    """Record every supported block of ``model`` while the context is open.

    The hooks only read, so the model's outputs are bit-identical with and without recording; they
    are removed on exit, also when the body raises. Views stay readable after the context closes.

    Args:
        model: any ``nn.Module`` containing supported blocks (see :func:`supported_classes`).
        layers: which blocks to record: indices into the supported blocks in module order, their
            names, or a predicate on the name. Default: all.
        grad: keep the autograd graph of recorded tensors, so views are differentiable
            (gradient-weighted explanations). Default: detached.

    Example::

        with implicit_hooks.record(model) as rec:
            model(input_ids)
        A = rec[0].attention[0, :, -1]     # last-token row of every channel of the first block
    """
    blocks = _select(find_blocks(model), layers)
    if not blocks:
        classes = "\n  ".join(supported_classes())
        raise UnsupportedModelError(
            f"{type(model).__name__} contains no block that implicit_hooks supports. Supported classes:\n"
            f"  {classes}\nRegister your own with implicit_hooks.register_patcher(...)."
        )
    recording = Recording()
    patchers: list[Patcher] = []
    handles: list = []
    try:
        attach_blocks(blocks, recording, patchers, handles, grad=grad)
        yield recording
    finally:
        for handle in handles:
            handle.remove()
        for patcher in patchers:
            patcher.close()
