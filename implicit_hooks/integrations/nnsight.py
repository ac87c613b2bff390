"""nnsight: the implicit attention of a model run inside ``with model.trace(...)``.

Two routes give the same :class:`~implicit_hooks.Recording` as :func:`implicit_hooks.record` on the
same input, for ``nnsight.NNsight(model)`` and ``nnsight.TransformersModel(model, tokenizer=...)``:

* **hooks** (local runs): ``rec = hooks(tracer)`` attaches implicit_hooks' read-only torch hooks when
  the trace body starts and removes them when the model's forward returns. The Recording fills as the
  model runs and is readable after the trace.
* **saves** (local and remote runs): ``saved = save(tracer)`` asks nnsight itself for what the patchers
  need, so nothing runs on the client: each block's call arguments (``block.inputs``, read the moment
  the block is called, so the patcher copies cache and module states as the call starts from them),
  the inputs and outputs of the sub-modules the patcher taps (one ``tracer.cache``, which keeps them
  in any order), and on request the inputs of the mixer's scan call (``block.source.<scan>.inputs``)
  and the block weights. After the trace, ``saved.recording()`` turns them into ``BlockRecord`` s.

Both helpers take the trace's ``tracer`` and are called first in the trace body (or in an invoke of
their own); they record one forward of the model. Example::

    import nnsight
    from implicit_hooks.integrations import nnsight as ihn

    model = nnsight.NNsight(hf_model)                 # or nnsight.TransformersModel(hf_model, tokenizer=tok)
    with model.trace(input_ids) as tracer:
        saved = ihn.save(tracer)                      # or: rec = ihn.hooks(tracer)
        logits = model.output.logits.save()
    rec = saved.recording()                           # a Recording, as implicit_hooks.record gives
    rec["backbone.layers.0.mixer"].attention[0, :, -1]

nnsight runs a module's class ``forward`` captured when it wraps the model; nothing here patches a
forward, a class or a module global: the hooks route uses torch's forward hooks only (entries in the
modules' hook dictionaries, written by ``implicit_hooks.patcher.Hooks`` as ``register_forward_hook``
writes them), the saves route nnsight's own reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import nnsight
import torch
from torch import nn

from ..errors import RecordingError, UnsupportedInputError, UnsupportedModelError
from ..patcher import Patcher
from ..recording import BlockRecord, Recording, _select, attach_blocks, kept_weights
from ..registry import _REGISTRY, _resolve, class_path, patcher_class_for, supported_classes

__all__ = ["SavedCalls", "hooks", "record", "save", "SCAN_CALLS"]

Layers = Sequence[int | str] | Callable[[str], bool] | None

#: ``tracer.fn`` names of runs that call the wrapped module's forward exactly once.
_ONE_FORWARD = frozenset({"__call__", "forward", "_call"})


def _scan_call(scan: str, step: str) -> Callable[[dict, int | None], str]:
    """The scan op for calls over a sequence, the step op for single-token calls from a recurrent state."""

    def choose(raw: dict, length: int | None) -> str:
        return step if length == 1 and raw.get("initial_state") is not None else scan

    return choose


#: The call inside a block's forward whose inputs ``save(..., scan=True)`` keeps, by patcher kind: the
#: name of that call in nnsight's ``block.source`` given what the patcher read (``record.raw``) and the
#: call's length. HF Mamba mixers pass a single-token step with a recurrent state to ``*_state_update``.
SCAN_CALLS: dict[str, Callable[[dict, int | None], str]] = {
    "mamba": _scan_call("mamba_selective_scan_0", "mamba_selective_state_update_0"),
    "mamba2": _scan_call("mamba2_chunk_scan_0", "mamba2_selective_state_update_0"),
}


# --- shared helpers ---------------------------------------------------------------------------------
def _root_module(tracer: Any) -> nn.Module:
    """The ``nn.Module`` an nnsight tracer runs (``tracer.envoy`` wraps it)."""
    envoy = getattr(tracer, "envoy", None)
    module = getattr(envoy, "_module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            "pass the tracer of a running trace: `with model.trace(...) as tracer: ihn.save(tracer)`; "
            f"got {type(tracer).__name__} (after the trace exits, nnsight drops the tracer's model)"
        )
    return module


def _unwrap(model: Any) -> nn.Module:
    """The ``nn.Module`` behind an nnsight wrapper (``NNsight``, ``TransformersModel``), or ``model``."""
    module = getattr(model, "_module", model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch module or an nnsight wrapper of one, got {type(model).__name__}")
    return module


def _patcher(cls: type[Patcher], module: nn.Module, name: str) -> Patcher:
    """``cls(module, name)`` (patchers read argument positions from the class ``forward``, which
    nnsight leaves alone when it wraps the instance's)."""
    return cls(module, name)


def _resolve_registered() -> dict[str, tuple[Any, type[Patcher]]]:
    resolved = {}
    for path, entry in _REGISTRY.items():
        try:
            resolved[path] = (entry, _resolve(entry))
        except Exception:  # resolved (and its error raised) lazily, where it is used
            continue
    return resolved


#: The registered patchers, imported when this module is: a remote run ships this table (by value, with
#: the trace body) so that a server without implicit_hooks installed finds them without importing it.
_PATCHERS = _resolve_registered()


def _patcher_class(module: nn.Module) -> type[Patcher] | None:
    """The registry's patcher for ``module``, taken from :data:`_PATCHERS` while it is the registered one."""
    for cls in type(module).__mro__:
        path = class_path(cls)
        entry = _REGISTRY.get(path)
        if entry is None:
            continue
        known = _PATCHERS.get(path)
        return known[1] if known is not None and known[0] == entry else patcher_class_for(module)
    return None


def _blocks(root: nn.Module, layers: Layers) -> list[tuple[str, nn.Module, type[Patcher]]]:
    found = []
    for name, module in root.named_modules():
        cls = _patcher_class(module)
        if cls is not None:
            found.append((name, module, cls))
    blocks = _select(found, layers)
    if not blocks:
        classes = "\n  ".join(supported_classes())
        raise UnsupportedModelError(
            f"{type(root).__name__} contains no block that implicit_hooks supports. Supported classes:\n"
            f"  {classes}\nRegister your own with implicit_hooks.register_patcher(...)."
        )
    return blocks


def _require_first(tracer: Any, call: str) -> Any:
    """Refuse a call made after the trace body read a model value (the model has started by then).

    nnsight's ``tracer.cache`` refuses exactly that case, so an empty cache is the probe.
    """
    try:
        return tracer.cache(modules=[], device=None)
    except ValueError as error:
        raise RecordingError(
            f"{call} must come before any other read in its trace body or invoke: the model has started, "
            f"so the blocks it already ran would be missing ({error})"
        ) from error


def _run_name(tracer: Any) -> str:
    fn = getattr(tracer, "fn", None)
    return fn if isinstance(fn, str) else getattr(fn, "__name__", type(fn).__name__)


def _is_remote(tracer: Any) -> bool:
    return type(getattr(tracer, "backend", None)).__name__ in ("RemoteBackend", "LocalSimulationBackend")


# --- route 1: torch hooks ---------------------------------------------------------------------------
@contextlib.contextmanager
def record(model: Any, *, layers: Layers = None, grad: bool = False) -> Iterator[Recording]:
    """:func:`implicit_hooks.record` on the module behind an nnsight wrapper, to open *around* traces.

    Unlike ``implicit_hooks.record(model._module)``, its patchers read argument positions from the class
    ``forward`` that nnsight runs (the instance ``forward`` of a wrapped module takes ``*args``). Use it
    for runs that call the forward many times (``model.generate(...)``, several traces)::

        with ihn.record(model) as rec:
            with model.generate(prompt, max_new_tokens=5):
                ...
        rec.calls("backbone.layers.0.mixer")   # one record per forward
    """
    root = _unwrap(model)
    recording = Recording()
    patchers: list[Patcher] = []
    handles: list = []
    try:
        attach_blocks(_blocks(root, layers), recording, patchers, handles, grad=grad)
        yield recording
    finally:
        _detach(patchers, handles)


def _detach(patchers: list, handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
    for patcher in patchers:
        patcher.close()


def hooks(tracer: Any, *, layers: Layers = None, grad: bool = False) -> Recording:
    """Record the traced forward through torch hooks; call first in the body of ``model.trace(...)``.

    The hooks are attached now (the trace body starts before the model does) and removed when the wrapped
    module's forward returns, also when it raises. The returned Recording is saved with nnsight, so it
    is readable after the trace; it holds a record per supported block, as :func:`implicit_hooks.record`.

    Args:
        tracer: the tracer of the running trace (``with model.trace(x) as tracer``).
        layers: which blocks (as in :func:`implicit_hooks.record`).
        grad: keep the autograd graph, so views are differentiable.

    Raises:
        UnsupportedInputError: under remote execution (no client-side hooks there: use :func:`save`), or
            for a run that calls the forward more than once (``generate``: wrap it in :func:`record`).
        RecordingError: when called after the trace body read a value (the model has started by then).

    Example::

        with model.trace(input_ids) as tracer:
            rec = ihn.hooks(tracer)
        rec[0].attention.dense()
    """
    root = _root_module(tracer)
    if _is_remote(tracer):
        raise UnsupportedInputError(
            "ihn.hooks needs torch hooks on the client, which a remote run does not have; "
            "use `saved = ihn.save(tracer)` and `saved.recording()` instead"
        )
    run = _run_name(tracer)
    if run not in _ONE_FORWARD:
        raise UnsupportedInputError(
            f"ihn.hooks records one forward, but this trace runs {run!r}, which may call it many times; "
            "open `with ihn.record(model):` around the call instead"
        )
    blocks = _blocks(root, layers)
    _require_first(tracer, "ihn.hooks(tracer)")
    recording = Recording()
    patchers: list[Patcher] = []
    handles: list = []
    started = []

    def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if getattr(tracer, "envoy", None) is None:
            _detach(patchers, handles)  # the trace ended before its forward ran (its body raised)
            return
        started.append(True)

    def close(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if started:
            _detach(patchers, handles)

    handles.append(root.register_forward_pre_hook(start, with_kwargs=True))
    try:
        attach_blocks(blocks, recording, patchers, handles, grad=grad)
    except BaseException:
        _detach(patchers, handles)
        raise
    handles.append(root.register_forward_hook(close, with_kwargs=True, always_call=True))
    return nnsight.save(recording)


# --- route 2: values saved through nnsight ----------------------------------------------------------
@dataclass
class _Call:
    """What the saves route keeps of one block call (plain data: it travels back from a remote run)."""

    name: str
    kind: str
    raw: dict[str, Any]
    weight_versions: dict[str, int]
    weights: dict[str, torch.Tensor] | None = None
    scan: dict[str, Any] | None = None


@dataclass
class SavedCalls:
    """The values :func:`save` asked nnsight for; :meth:`recording` turns them into a Recording.

    Plain data (tensors, ints, nnsight's caches of the tapped modules), so it survives the return trip of
    a remote run. ``taps[name]`` maps each tap key of block ``name`` to ``(module path in nnsight, "input" |
    "output")``; ``block_paths[name]`` is the block's own nnsight path. ``outputs`` caches the outputs of
    the model (``root_path``), the blocks and the output taps, ``inputs`` the inputs of the input taps
    (``None`` without any).
    """

    calls: list[_Call]
    blocks: list[str]
    taps: dict[str, dict[str, tuple[str, str]]]
    block_paths: dict[str, str]
    outputs: Any
    inputs: Any
    root_path: str = ""
    grad: bool = False
    _root: nn.Module | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # The model stays where it is (on a server, in a remote run): recording() takes the client's.
        return {**self.__dict__, "_root": None}

    def recording(self, model: Any = None) -> Recording:
        """The :class:`~implicit_hooks.Recording` of the saved calls, one record per block call.

        Args:
            model: the model (nnsight wrapper or module) whose patchers read the records: needed after a
                remote run, or after this object was pickled; by default the traced one.

        Raises:
            RecordingError: a block's forward never finished, a tap fired a different number of times
                than its block, or the weights are not on the client (pass ``weights="saved"``).
        """
        root = self._root if model is None else _unwrap(model)
        if root is None:
            raise RecordingError("these saved calls travelled without their model: saved.recording(model)")
        modules = dict(root.named_modules())
        recording = Recording()
        recording.blocks = list(self.blocks)
        patchers: dict[str, Patcher] = {}
        seen: dict[str, int] = {}
        for call in self.calls:
            module = modules.get(call.name)
            cls = None if module is None else _patcher_class(module)
            if cls is None:
                raise RecordingError(f"{call.name}: no such supported block in the given model")
            patcher = patchers.setdefault(call.name, _patcher(cls, module, call.name))
            index = seen[call.name] = seen.get(call.name, -1) + 1
            recording._append(self._record(call, patcher, index))
        return recording

    # --- assembly -----------------------------------------------------------------------------
    @staticmethod
    def _visits(cache: Any, path: str, slot: str) -> list[Any]:
        """One value per visit of the module at ``path`` (``slot``: ``"output"`` or ``"inputs"``)."""
        if cache is None or path not in cache.keys():
            return []
        if "." not in path:  # the model itself: a one-part path is navigated, which needs the dropped model
            return [getattr(entry, slot) for entry in cache._cache.entries[path]]
        view = cache[path]
        values = getattr(view, slot)
        return [values] if len(view) == 1 else list(values)

    def _record(self, call: _Call, patcher: Patcher, index: int) -> BlockRecord:
        record = BlockRecord(call.name, call.kind, patcher, grad=self.grad)
        if call.weights is not None:
            record.weights = call.weights
            record.weight_versions = {k: w._version for k, w in call.weights.items()}
        else:
            weights = dict(patcher.weights())
            meta = [k for k, w in weights.items() if w.is_meta]
            if meta:
                raise RecordingError(
                    f"{call.name}: weights {meta} are not on this machine (meta tensors of a remote model); "
                    "save them with the call: ihn.save(tracer, weights='saved')"
                )
            record.weights = kept_weights(weights, self.grad)
            record.weight_versions = dict(call.weight_versions)
        record.raw.update(call.raw)
        if call.scan is not None:
            record.raw["scan"] = call.scan
        block_visits = self._visits(self.outputs, self.block_paths[call.name], "output")
        forwards = len(self._visits(self.outputs, self.root_path, "output"))
        if len(block_visits) > max(forwards, 1):
            raise RecordingError(
                f"{call.name} was called {len(block_visits)} times in {forwards} forward(s) (a block shared "
                "by several layers?) and the saves route reads one call of each block per forward; leave it "
                "out with layers=..., or record with ihn.hooks / ihn.record"
            )
        for key, (path, where) in self.taps[call.name].items():
            if where == "output":
                visits = self._visits(self.outputs, path, "output")
            else:
                visits = [_first_input(v) for v in self._visits(self.inputs, path, "inputs")]
            if not visits:
                continue  # never called as a module on this path: the patcher says what is missing
            if len(visits) != len(block_visits):
                raise RecordingError(
                    f"{call.name}: tap {key!r} ({path}) was called {len(visits)} times during "
                    f"{len(block_visits)} calls of its block, so its values cannot be matched to calls"
                )
            record.raw[key] = visits[index]
        finished = index < len(block_visits) and block_visits[index] is not None
        record.status = "complete" if finished else "failed"
        return record


def _first_input(inputs: Any) -> Any:
    """The first positional argument of a module call, as a forward hook's ``args[0]``."""
    if inputs is None:
        return None
    args, kwargs = inputs
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def save(
    tracer: Any,
    *,
    layers: Layers = None,
    grad: bool = False,
    weights: str = "local",
    scan: bool = False,
) -> SavedCalls:
    """Save through nnsight what the views of the traced forward need; call first in the trace body.

    Works wherever the trace body runs, also on a server (``remote=True``, or nnsight's local emulation
    ``remote="local"``): it only reads ``block.inputs``, a ``tracer.cache`` of the tapped sub-modules and,
    with ``scan=True``, ``block.source.<scan call>.inputs``. Each block's patcher reads the call's
    arguments the moment the block is called (``Patcher.on_call``), so cache states a call continues
    from are copied before the forward changes them. Later reads in the same body must be of places the
    model reaches after the last recorded block (``model.output``, ``tracer.result``), or go in another
    ``tracer.invoke``.

    Args:
        tracer: the tracer of the running trace (``with model.trace(x) as tracer``). Inside
            ``tracer.invoke(...)`` the calls are those rows of the batch; in an empty ``tracer.invoke()``
            (or a trace given its input directly), the whole batch.
        layers: which blocks (as in :func:`implicit_hooks.record`).
        grad: keep the autograd graph, so views are differentiable.
        weights: ``"local"``: views read the weights of the model on this machine (the same tensors in a
            local run); ``"saved"``: save copies of the block weights with the call (for remote runs,
            where the client model is on the meta device).
        scan: also keep the inputs of the mixer's scan call (families in :data:`SCAN_CALLS`) in
            ``record.raw["scan"]`` as ``{"op", "args", "kwargs"}``: the model's own Δ, B, C, z.

    Returns:
        A :class:`SavedCalls` (saved with nnsight): after the trace, ``saved.recording()``.

    Example::

        with model.trace(input_ids, remote="local") as tracer:
            saved = ihn.save(tracer, weights="saved")
        rec = saved.recording(model)
    """
    if weights not in ("local", "saved"):
        raise ValueError(f"weights must be 'local' or 'saved', got {weights!r}")
    root = _root_module(tracer)
    envoy_of = {id(envoy._module): envoy for envoy in tracer.envoy.modules()}
    blocks = _blocks(root, layers)
    plan = []
    taps: dict[str, dict[str, tuple[str, str]]] = {}
    # the model's own output counts its forwards
    watched: dict[str, dict[str, Any]] = {"output": {tracer.envoy.path: tracer.envoy}, "input": {}}
    for name, module, cls in blocks:
        patcher = _patcher(cls, module, name)
        block_envoy = envoy_of[id(module)]
        watched["output"][block_envoy.path] = block_envoy
        taps[name] = {}
        for key, (sub, where) in patcher.taps().items():
            if where not in ("input", "output"):
                raise ValueError(f"{name}: tap {key!r}: where must be 'input' or 'output', got {where!r}")
            sub_envoy = envoy_of[id(sub)]
            watched[where][sub_envoy.path] = sub_envoy
            taps[name][key] = (sub_envoy.path, where)
        plan.append((name, patcher, block_envoy))
    _require_first(tracer, "ihn.save(tracer)")
    # The tapped values through nnsight's caches: they keep every visit, whatever the order of the calls.
    outputs = tracer.cache(modules=list(watched["output"].values()), device=None, detach=not grad)
    inputs = None
    if watched["input"]:
        inputs = tracer.cache(
            modules=list(watched["input"].values()),
            device=None,
            detach=not grad,
            include_output=False,
            include_inputs=True,
        )

    calls = []
    for name, patcher, block_envoy in plan:
        args, kwargs = block_envoy.inputs  # waits until the block is called: its state is the call's own
        options = dict(grad=grad, weights=weights, scan=scan)
        calls.append(_call_of(name, patcher, block_envoy, args, kwargs, **options))
    saved = SavedCalls(
        calls=calls,
        blocks=[name for name, _, _ in blocks],
        taps=taps,
        block_paths={name: envoy.path for name, _, envoy in plan},
        root_path=tracer.envoy.path,
        outputs=outputs,
        inputs=inputs,
        grad=grad,
        _root=root,
    )
    return nnsight.save(saved)


def _call_of(
    name: str,
    patcher: Patcher,
    block_envoy: Any,
    args: tuple,
    kwargs: dict,
    *,
    grad: bool,
    weights: str,
    scan: bool,
) -> _Call:
    """Run the patcher's ``on_call`` on the live arguments and keep what it read (inside the trace)."""
    if patcher.copy_taps:
        raise UnsupportedInputError(
            f"{name}: the {patcher.kind} patcher copies taps {sorted(patcher.copy_taps)} that the model "
            "changes in place later, which nnsight's cache cannot do; record it with ihn.hooks or ihn.record"
        )
    probe = BlockRecord(name, patcher.kind, patcher, grad=grad)
    patcher.on_call(probe, args, kwargs)
    hidden = _first_tensor(args, kwargs)
    batch = None if hidden is None else hidden.shape[0]
    for key, value in probe.raw.items():
        # An invoke sees its own rows of the block's arguments, but a cache read by the patcher is the whole
        # batch's: refuse rather than mix rows.
        if isinstance(value, torch.Tensor) and value.dim() > 0 and batch is not None:
            if value.shape[0] not in (1, batch):
                raise UnsupportedInputError(
                    f"{name}: {key!r} read by the patcher has {value.shape[0]} rows but this invoke sees "
                    f"{batch}; record calls that continue from a cache in an empty tracer.invoke()"
                )
    current = dict(patcher.weights())
    kept = None
    if weights == "saved":
        kept = {k: (w if grad else w.detach()).clone() for k, w in current.items()}
    scanned = None
    choose = SCAN_CALLS.get(patcher.kind)
    if scan and choose is not None:
        length = hidden.shape[1] if hidden is not None and hidden.dim() > 1 else None
        op = choose(probe.raw, length)
        source = block_envoy.source
        if op not in source.names:
            raise UnsupportedInputError(
                f"{name}: {type(patcher.module).__name__}.forward makes no call {op!r} to read the scan's "
                f"inputs from; calls there: {', '.join(source.names)}. Save without scan=True."
            )
        scan_args, scan_kwargs = getattr(source, op).inputs
        if not grad:
            scan_args, scan_kwargs = _detached((scan_args, scan_kwargs))
        scanned = {"op": op, "args": scan_args, "kwargs": scan_kwargs}
    return _Call(
        name=name,
        kind=patcher.kind,
        raw=dict(probe.raw),
        weight_versions={k: w._version for k, w in current.items()},
        weights=kept,
        scan=scanned,
    )
