"""The registry of patchers, keyed by the class path of the block they support.

Class paths are strings (``"transformers.models.mamba.modeling_mamba.MambaMixer"``), so looking up a
module never imports transformers, rwkv or nnsight: a module matches when the path of its class, or of
any base class, is registered. Patchers may be given as classes or as ``"package.module:Name"``
strings that are imported only when a matching block is found.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .patcher import Patcher

_REGISTRY: dict[str, type[Patcher] | str] = {}
#: class path of a module's class → the registry key it matched ("" for none); cleared on registration.
#: Strings only: nnsight pickles patcher classes by value, with what their functions reference.
_MATCHES: dict[str, str] = {}


def class_path(cls: type) -> str:
    """The registry key of a class: ``module.QualName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_patcher(block: str | type, patcher: type[Patcher] | str, *, replace: bool = False) -> None:
    """Register ``patcher`` for every module whose class (or a base class) is ``block``.

    This is the call the built-in patchers use. Example, for a block of your own::

        import implicit_hooks
        implicit_hooks.register_patcher("mypkg.layers.MyRecurrentBlock", MyPatcher)
        # or lazily, without importing your package now:
        implicit_hooks.register_patcher("mypkg.layers.MyRecurrentBlock", "mypkg.explain:MyPatcher")

    Args:
        block: the block's class, or its path ``"package.module.ClassName"``.
        patcher: a :class:`~implicit_hooks.Patcher` subclass, or ``"package.module:Name"``.
        replace: allow replacing a patcher already registered for ``block``.
    """
    key = block if isinstance(block, str) else class_path(block)
    if "." not in key:
        raise ValueError(f"block must be a class or a dotted class path like 'pkg.module.Class', got {key!r}")
    if isinstance(patcher, str) and ":" not in patcher:
        raise ValueError(f"a lazy patcher is written 'package.module:Name', got {patcher!r}")
    if key in _REGISTRY and not replace and _REGISTRY[key] != patcher:
        raise ValueError(f"a patcher is already registered for {key}; pass replace=True to override it")
    _REGISTRY[key] = patcher
    _MATCHES.clear()


def supported_classes() -> list[str]:
    """The class paths that have a registered patcher, sorted."""
    return sorted(_REGISTRY)


def _resolve(entry: type[Patcher] | str) -> type[Patcher]:
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module_name), attr)
    return entry


def patcher_class_for(module: nn.Module) -> type[Patcher] | None:
    """The patcher registered for this module's class or its nearest registered base, if any."""
    own = class_path(type(module))
    if own not in _MATCHES:
        _MATCHES[own] = next((p for p in map(class_path, type(module).__mro__) if p in _REGISTRY), "")
    key = _MATCHES[own]
    return _resolve(_REGISTRY[key]) if key else None
