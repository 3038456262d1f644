"""A HybridModel layer spec built only from Megatron-Core's own (non-Transformer-Engine) modules.

Megatron's stock `hybrid_stack_spec` needs Transformer Engine. This spec uses the local
`get_gpt_layer_local_submodules` pieces, split into HybridModel's layer kinds: `*` is
norm -> self-attention (GQA, optional QK-norm) -> residual, `-` is norm -> MLP -> residual,
`M` is norm -> Megatron's Mamba-2 mixer (in_proj `ColumnParallelLinear`, conv, SSD scan, gated
RMSNorm, out_proj `RowParallelLinear`) -> residual. A Qwen3 block is `*-`; a dense model is
the pattern `*-` repeated; Nemotron-H interleaves `M-` with a few `*-`.

Mamba layers use `models.mamba.LocalMambaLayer` / `LocalMambaMixer` (Megatron's classes plus
padding masks, batched static decoding and TP-invariant init); where `mamba_ssm` does not
import, building a mixer first binds the pure-torch kernels (`models.mamba.adapter`).

It runs everywhere (CPU, any GPU) and is what the CPU backend tests exercise.

Checkpoint names are Transformer Engine's. Megatron's TE specs fuse each pre-norm into the
linear after it (`TELayerNormColumnParallelLinear`), so a TE checkpoint stores the norm as
`<linear>.layer_norm_weight`. Each local layer renames its norm to that key in its sharded
state dict, through Megatron's own `sharded_state_dict_keys_map` (as
`gpt_layer_specs.get_gpt_layer_local_submodules` does for GPT): checkpoints move between the
local and the TE spec, and Megatron-LM runs read them (megatron_rlp/interop/). Module names
(`state_dict()`) stay local. Checkpoints saved before this map are read by
`interop.names.match_checkpoint_names`.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_rlp.models.mamba.mixer import LocalMambaLayer, LocalMambaMixer
from megatron_rlp.models.moe import local_moe_layer_spec

# Local norm -> TE fused-norm key (sharded_state_dict_keys_map; prefixes of a layer's keys).
TE_NAMES_ATTENTION = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
TE_NAMES_MLP = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
TE_NAMES_MAMBA = {"norm.": "mixer.in_proj.layer_norm_"}


class LocalNorm:
    """`torch.nn.RMSNorm` / `LayerNorm` with Megatron's norm signature.

    Unlike Megatron's `WrappedTorchNorm` it supports sequence parallel: the weights are
    tagged `sequence_parallel` so `finalize_model_grads` all-reduces their gradients over
    the tensor-parallel group (each rank saw only its slice of the sequence).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}[
            config.normalization
        ]
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


class LocalHybridStack(HybridStack):
    """HybridStack whose final norm is `LocalNorm` (the stock one hard-codes `TENorm`)."""

    def __init__(self, config: TransformerConfig, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = LocalNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


def local_hybrid_stack_spec(qk_layernorm: bool, normalization: str) -> ModuleSpec:
    """HybridStack spec for `*` (attention), `-` (MLP), `M` (Mamba-2) and `E` (MoE,
    models/moe.py) layers without Transformer Engine. Other layer kinds (`G`, `D`, ...) are
    unset and refused by config validation (an unset kind would silently build as an
    identity)."""
    full = get_gpt_layer_local_submodules(qk_layernorm=qk_layernorm, normalization=normalization)
    attention = full.self_attention
    if qk_layernorm:
        attention.submodules.q_layernorm = LocalNorm
        attention.submodules.k_layernorm = LocalNorm
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=attention,
            self_attn_bda=full.self_attn_bda,
            sharded_state_dict_keys_map=dict(TE_NAMES_ATTENTION),
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=LocalNorm, mlp=full.mlp, mlp_bda=full.mlp_bda,
            sharded_state_dict_keys_map=dict(TE_NAMES_MLP),
        ),
    )
    mamba_layer = ModuleSpec(
        module=LocalMambaLayer,
        submodules=MambaLayerSubmodules(
            norm=LocalNorm,
            mixer=ModuleSpec(
                module=LocalMambaMixer,
                submodules=MambaMixerSubmodules(
                    # The full master weight is kept so LocalMambaMixer can shard [z,x,B,C,dt]
                    # block by block (TP-invariant init); it is dropped right after.
                    in_proj=ModuleSpec(module=ColumnParallelLinear,
                                       params={"keep_master_weight_for_test": True}),
                    out_proj=RowParallelLinear,
                ),
            ),
            mamba_bda=full.mlp_bda,
            sharded_state_dict_keys_map=dict(TE_NAMES_MAMBA),
        ),
    )
    return ModuleSpec(
        module=LocalHybridStack,
        submodules=HybridStackSubmodules(attention_layer=attention_layer, mlp_layer=mlp_layer,
                                         mamba_layer=mamba_layer,
                                         moe_layer=local_moe_layer_spec(LocalNorm)),
    )
