"""Integrations with other interpretability tools, each imported only on request.

* :mod:`implicit_hooks.integrations.nnsight` – recordings from inside ``with model.trace(...)`` of
  `nnsight <https://nnsight.net>`_ (``nnsight.NNsight`` and ``nnsight.TransformersModel``), through torch
  hooks or through values saved by nnsight itself (which also works under remote execution).

Importing this package imports none of them.
"""
