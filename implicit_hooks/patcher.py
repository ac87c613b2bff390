"""The base class of every patcher: one object per supported block, owning that block's hooks.

A patcher attaches hooks that *only read*: a forward pre-hook on the block (its inputs, with keyword
arguments), forward hooks on the sub-modules it taps, and an always-called forward hook on the block
that closes the call. It never changes an argument or an output, so the model computes exactly what it
computes without us. Everything expensive happens later, when a view is read: :meth:`Patcher.factors`
turns what was recorded, plus the block's weights, into the :class:`~implicit_hooks.view.Factors` of
the implicit attention.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import UnsupportedInputError, UnsupportedModelError
from .recording import BlockRecord, Replacements, kept_weights
from .view import Factors


class Patcher:
    """Records the calls of one block and turns each call into factors.

    Subclasses set :attr:`kind`, say which sub-module inputs or outputs to keep (:attr:`tap_paths`, or
    :meth:`taps`), read the block's own arguments in :meth:`on_call`, name the weights the maths reads in
    :attr:`weight_paths`, and implement :meth:`factors`. Example (a block ``y = sigmoid(g) * cumsum(v)``
    of your own)::

        class CumsumPatcher(implicit_hooks.Patcher):
            kind = "cumsum"
            tap_paths = {"v": ("value", "output"), "g": ("gate", "output")}
            def factors(self, record, dtype):
                v = record.raw["v"].to(dtype).transpose(1, 2)          # (B, C, L)
                g = torch.sigmoid(record.raw["g"].to(dtype)).transpose(1, 2)
                return Factors(values=v, core=DenseCore(torch.ones(...).tril()), left={"gate": g})

        implicit_hooks.register_patcher(MyCumsumBlock, CumsumPatcher)
    """

    kind: ClassVar[str] = "custom"
    #: the tap holding the block's real output before its output projection, laid out ``(B, L, C)``.
    real_output_key: ClassVar[str | None] = None
    #: taps whose tensors the model may later change in place: these are cloned when recorded.
    copy_taps: ClassVar[frozenset[str]] = frozenset()
    #: ``key -> path`` of the parameters and buffers the maths reads, relative to the block
    #: (``"conv1d.weight"``); the default :meth:`weights` returns those that exist (an absent bias is left
    #: out).
    weight_paths: ClassVar[Mapping[str, str]] = {}
    #: ``key -> (path, "input" | "output")`` of the sub-modules the default :meth:`taps` taps, relative to
    #: the block (``"in_proj"``); override :meth:`taps` for taps that depend on the instance.
    tap_paths: ClassVar[Mapping[str, tuple[str, str]]] = {}
    #: whether other supported blocks may sit among this block's sub-modules: ``record`` searches below a
    #: block only then. False for every built-in family (their sub-modules are projections, convs, norms).
    holds_blocks: ClassVar[bool] = True

    def __init__(self, module: nn.Module, name: str):
        self.module = module
        self.name = name
        self._open: list[BlockRecord] = []
        self._signature = _signature_of(module)

    # --- what subclasses describe -------------------------------------------------------------
    def taps(self) -> Mapping[str, tuple[nn.Module, str]]:
        """``key -> (sub_module, "input" | "output")``: tensors kept in ``record.raw[key]``; by default the
        sub-modules at :attr:`tap_paths`."""
        module = self.module
        return {key: (submodule_at(module, path), where) for key, (path, where) in self.tap_paths.items()}

    def on_call(self, record: BlockRecord, args: tuple, kwargs: dict) -> None:
        """Read the block's own arguments at the start of a call (no host synchronisation here)."""

    def weights(self) -> Mapping[str, torch.Tensor]:
        """The parameters and buffers the maths reads (:attr:`weight_paths`); a view refuses to build if they
        change in place later."""
        return tensors_at(self.module, self.weight_paths)

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        """The factors of one recorded call, computed in ``dtype``."""
        raise NotImplementedError

    def tensors(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
        """Named tensors of the call (``"decay"``, ``"gate"``, …) as thunks, shown in ``record.tensors``."""
        return {}

    def real_output(self, record: BlockRecord) -> torch.Tensor | None:
        """The block's real output before its output projection, ``(B, C, L)``, if it was observable."""
        y = record.raw.get(self.real_output_key) if self.real_output_key else None
        return None if y is None else y.transpose(1, 2)

    # --- helpers for subclasses -----------------------------------------------------------------
    def argument(self, name: str, args: tuple, kwargs: dict, default: Any = None) -> Any:
        """The block's argument ``name``, whether it came by position or by keyword."""
        if name in kwargs:
            return kwargs[name]
        index = self._signature.get(name)
        if index is not None and index < len(args):
            return args[index]
        return default

    # --- the hook lifecycle (shared by every patcher) -------------------------------------------
    def attach(self, on_record: Callable[[BlockRecord], None], *, grad: bool = False,
               replacements: Replacements | None = None) -> list:  # fmt: skip
        """Attach the hooks; returns their handles (the caller removes them). The block's weights are looked
        up now, and again at the first call after ``replacements`` counted one (a weight, or a module on its
        path, replaced while the hooks are on: that call and the later ones read the new one)."""
        # the hooks read closure cells, not attributes: 7-15 % less host time in the hooks, measured where a
        # forward keeps the host busy between them (Mamba-2, 24 layers, a 2-core CPU; run ZZ)
        name, kind, opened, on_call = self.name, self.kind, self._open, self.on_call
        count = replacements.count if replacements is not None else [0]
        # (the replacements counted, the weights, as records keep them): one lookup a context, not a call (a
        # lookup in every call took 8.6 µs a block inside a forward, cold, against 2 µs at set-up)
        looked_up: list = []

        def look_up() -> None:
            weights = dict(self.weights())
            looked_up[:] = (count[0], weights, kept_weights(weights, grad))  # detached when first read

        look_up()

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if looked_up[0] != count[0]:
                look_up()
            _, weights, kept = looked_up
            record = BlockRecord(name, kind, self, grad=grad)
            record.weights = kept
            record.weight_versions = {k: w._version for k, w in weights.items()}
            on_call(record, args, kwargs)
            opened.append(record)
            on_record(record)

        def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if opened:
                # An always-called hook sees output None when the forward raised.
                opened.pop().status = "complete" if output is not None else "failed"

        def make_tap(key: str, where: str) -> Callable:
            if where not in ("input", "output"):
                raise ValueError(f"tap {key!r}: where must be 'input' or 'output', got {where!r}")
            from_input, copy = where == "input", key in self.copy_taps

            def tap(module: nn.Module, args: tuple, output: Any) -> None:
                if opened:
                    tensor = args[0] if from_input else output
                    if isinstance(tensor, torch.Tensor):
                        if not grad and tensor.requires_grad:  # under no_grad nothing needs detaching
                            tensor = tensor.detach()
                        if copy:
                            tensor = tensor.clone()
                    opened[-1].raw[key] = tensor

            return tap

        # every tap resolved and checked before the first hook goes on: one that fails leaves none behind
        taps = [(sub, make_tap(key, where)) for key, (sub, where) in self.taps().items()]
        hooks = Hooks()
        hooks.add(self.module, pre_hook, pre=True, with_kwargs=True)
        for sub, tap in taps:
            hooks.add(sub, tap)
        hooks.add(self.module, post_hook, always_call=True)
        return [hooks]

    def close(self) -> None:
        """Mark calls that never finished (the context exited inside a forward) as failed."""
        while self._open:
            self._open.pop().status = "failed"


class Hooks:
    """Forward hooks on modules, removed together: what ``register_forward_pre_hook`` /
    ``register_forward_hook`` and their handles do, written into the modules' hook dictionaries directly.

    torch makes a ``RemovableHandle`` per hook, 1.3 µs each (three weak references and a write to a class
    attribute), 2 µs with the registration: for 24 blocks of four hooks a fifth of what entering ``record``
    costs (Mamba-2's forward at batch 1 is host-bound: that adds to its time). The dictionaries are those
    ``nn.Module`` has had since torch 2.1 and calls the hooks from, in insertion order; the keys count down
    from -1, so they never meet torch's, which count up from 0.
    """

    _next = [-1]  # a list, not an itertools.count: nnsight pickles patcher code by value

    def __init__(self) -> None:
        self._entries: list[tuple[dict, int]] = []

    def add(self, module: nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False,
            always_call: bool = False) -> None:  # fmt: skip
        """A forward pre-hook (``pre``) or forward hook on ``module``, as torch's ``register_*`` takes it."""
        key = Hooks._next[0]
        Hooks._next[0] = key - 1
        hooks = module._forward_pre_hooks if pre else module._forward_hooks
        hooks[key] = hook
        self._entries.append((hooks, key))
        if with_kwargs:
            flags = module._forward_pre_hooks_with_kwargs if pre else module._forward_hooks_with_kwargs
            flags[key] = True
            self._entries.append((flags, key))
        if always_call:
            module._forward_hooks_always_called[key] = True
            self._entries.append((module._forward_hooks_always_called, key))

    def remove(self) -> None:
        """Remove every hook added (again: nothing)."""
        for hooks, key in self._entries:
            hooks.pop(key, None)
        self._entries.clear()


#: ``(module, qualname, id of forward)`` of a class → its argument positions. Names and numbers only: the
#: cache travels with patcher classes that nnsight pickles by value, so it must never hold classes.
_SIGNATURES: dict[tuple[str, str, int], dict[str, int]] = {}


def _signature_of(module: nn.Module) -> dict[str, int]:
    """Positional index of each argument of the class's ``forward`` (without ``self``).

    The class's, not the instance's: wrappers such as nnsight replace the instance ``forward`` with a
    ``(*args, **kwargs)`` function, which would hide the argument names. Computed once per class
    (``inspect.signature`` costs tens of microseconds, once per block on every ``record``).
    """
    cls = type(module)
    forward = getattr(cls, "forward", None)
    key = (cls.__module__, cls.__qualname__, id(forward))
    if key not in _SIGNATURES:
        try:
            params = list(inspect.signature(forward).parameters.items())[1:]  # drop self
        except (TypeError, ValueError):
            return {}
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        _SIGNATURES[key] = {name: i for i, (name, p) in enumerate(params) if p.kind in kinds}
    return _SIGNATURES[key]  # shared by every patcher of the class, read only


#: ``"a.b.weight"`` → ``(("a", "b"), "weight")``: a block's weight paths, split once
_PATHS: dict[str, tuple[tuple[str, ...], str]] = {}


def _parsed(path: str) -> tuple[tuple[str, ...], str]:
    *parents, name = path.split(".")
    return tuple(parents), name


def submodule_at(module: nn.Module, path: str) -> nn.Module:
    """``module.<path>``, a sub-module (``"mixer.in_proj"``), read from the module tree's own dictionaries
    (as :func:`tensors_at`: every ``record`` resolves each block's taps)."""
    owner: nn.Module | None = module
    for name in path.split("."):
        owner = owner._modules.get(name) if owner is not None else None
    if owner is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no sub-module {path!r} to tap")
    return owner


def tensors_at(module: nn.Module, paths: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``{key: module.<path>}`` for the ``paths`` that name a tensor (a parameter, a buffer or a plain tensor
    attribute); the others are left out.

    Read from the module tree's own dictionaries: every ``record`` looks up each block's weights, and
    attribute access on a module costs about a microsecond a name (``nn.Module.__getattr__`` runs after a
    failed lookup), 20× these dictionary reads.
    """
    found = {}
    for key, path in paths.items():
        parents, name = _PATHS.get(path) or _PATHS.setdefault(path, _parsed(path))
        owner: nn.Module | None = module
        for parent in parents:
            owner = owner._modules.get(parent) if owner is not None else None
        if owner is None:
            continue
        tensor = owner._parameters.get(name)
        if tensor is None:
            tensor = owner._buffers.get(name)
        if tensor is None:
            tensor = owner.__dict__.get(name)
        if isinstance(tensor, torch.Tensor):
            found[key] = tensor
    return found


def require(condition: bool, message: str) -> None:
    """Raise :class:`UnsupportedInputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UnsupportedInputError(message)
