"""Built-in patchers, registered by class path. Nothing here imports transformers, rwkv or nnsight."""

from ..registry import register_patcher

_TF = "transformers.models"
_OURS = "implicit_hooks.families"
_BUILTIN = {
    f"{_TF}.mamba.modeling_mamba.MambaMixer": f"{_OURS}.mamba:MambaPatcher",
    f"{_TF}.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer": f"{_OURS}.mamba:FalconMambaPatcher",
    f"{_TF}.jamba.modeling_jamba.JambaMambaMixer": f"{_OURS}.mamba:JambaMambaPatcher",
    # --- RG-LRU and RWKV-4 (griffin.py, rwkv4.py) ---
    f"{_TF}.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock": (
        f"{_OURS}.griffin:RGLRUPatcher"
    ),
    f"{_TF}.rwkv.modeling_rwkv.RwkvSelfAttention": f"{_OURS}.rwkv4:RWKV4Patcher",
    # --- Mamba-2 family and Zamba (mamba2.py) ---
    # --- softmax attention layers of Griffin and the hybrids (attention.py) ---
}

for _block, _patcher in _BUILTIN.items():
    register_patcher(_block, _patcher)
