"""implicit_hooks: the exact implicit attention of attention-free sequence models.

Every gated-linear recurrent block (Mamba, Mamba-2, RWKV, Griffin/RG-LRU) computes, per channel,
``y = A(x) · x + bias`` with a causal ``L × L`` matrix ``A`` built from its gate, recurrence,
activation and short convolution. ``record`` attaches read-only hooks to an unmodified model and
gives, per block call, a lazy :class:`AttentionView` of that matrix::

    import implicit_hooks
    with implicit_hooks.record(model) as rec:
        model(input_ids)
    view = rec["backbone.layers.0.mixer"].attention   # (batch, channels, L, L), lazy
    last_row = view[0, :, -1]                          # (channels, L)

Importing this package imports neither transformers, rwkv nor nnsight.
"""

from . import families as _families  # noqa: F401  (registers the built-in patchers)
from .errors import ImplicitHooksError, RecordingError, UnsupportedInputError, UnsupportedModelError
from .explain import Attribution, Explainer, GradAttention, RawAttention, Rollout
from .patcher import Patcher
from .recording import BlockRecord, Recording, find_blocks, record
from .registry import register_patcher, supported_classes
from .view import AttentionView, Core, DenseCore, Factors

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "AttentionView",
    "BlockRecord",
    "Core",
    "DenseCore",
    "Explainer",
    "Factors",
    "GradAttention",
    "ImplicitHooksError",
    "Patcher",
    "RawAttention",
    "Recording",
    "RecordingError",
    "Rollout",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "find_blocks",
    "record",
    "register_patcher",
    "supported_classes",
]
