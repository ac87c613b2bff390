"""Built-in patchers, registered by class path. Nothing here imports transformers, rwkv or nnsight."""

from ..registry import register_patcher

_BUILTIN = {
    "transformers.models.mamba.modeling_mamba.MambaMixer": "implicit_hooks.families.mamba:MambaPatcher",
    "transformers.models.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer":
        "implicit_hooks.families.mamba:FalconMambaPatcher",
    "transformers.models.jamba.modeling_jamba.JambaMambaMixer": "implicit_hooks.families.mamba:JambaMambaPatcher",
}

for _block, _patcher in _BUILTIN.items():
    register_patcher(_block, _patcher)
