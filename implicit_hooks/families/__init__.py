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
    f"{_TF}.mamba2.modeling_mamba2.Mamba2Mixer": f"{_OURS}.mamba2:Mamba2Patcher",
    f"{_TF}.bamba.modeling_bamba.BambaMixer": f"{_OURS}.mamba2:Mamba2Patcher",
    f"{_TF}.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer": f"{_OURS}.mamba2:Mamba2Patcher",
    f"{_TF}.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer": (
        f"{_OURS}.mamba2:Mamba2Patcher"
    ),
    f"{_TF}.zamba2.modeling_zamba2.Zamba2MambaMixer": f"{_OURS}.mamba2:Mamba2Patcher",
    f"{_TF}.falcon_h1.modeling_falcon_h1.FalconH1Mixer": f"{_OURS}.mamba2:FalconH1Patcher",
    f"{_TF}.zamba.modeling_zamba.ZambaMambaMixer": f"{_OURS}.zamba:ZambaMambaPatcher",
    # --- softmax attention layers of Griffin and the hybrids (attention.py) ---
    f"{_TF}.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaAttention": (
        f"{_OURS}.attention:RecurrentGemmaAttentionPatcher"
    ),
    f"{_TF}.jamba.modeling_jamba.JambaAttention": f"{_OURS}.attention:SoftmaxAttentionPatcher",
    f"{_TF}.zamba.modeling_zamba.ZambaAttention": f"{_OURS}.attention:SoftmaxAttentionPatcher",
    f"{_TF}.zamba2.modeling_zamba2.Zamba2Attention": f"{_OURS}.attention:Zamba2AttentionPatcher",
    f"{_TF}.bamba.modeling_bamba.BambaAttention": f"{_OURS}.attention:SoftmaxAttentionPatcher",
    f"{_TF}.nemotron_h.modeling_nemotron_h.NemotronHAttention": f"{_OURS}.attention:SoftmaxAttentionPatcher",
    f"{_TF}.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridAttention": (
        f"{_OURS}.attention:SoftmaxAttentionPatcher"
    ),
    f"{_TF}.falcon_h1.modeling_falcon_h1.FalconH1Attention": f"{_OURS}.attention:FalconH1AttentionPatcher",
    # --- rwkv package (rwkv_pkg.py) ---
    "rwkv.model.RWKV": f"{_OURS}.rwkv_pkg:RWKVPackagePatcher",
    "rwkv.model.RWKV_x070": f"{_OURS}.rwkv7:RWKV7PackagePatcher",
}

for _block, _patcher in _BUILTIN.items():
    register_patcher(_block, _patcher)
