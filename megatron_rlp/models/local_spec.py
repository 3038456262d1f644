"""A HybridModel layer spec built only from Megatron-Core's own (non-Transformer-Engine) modules.

Megatron's stock `hybrid_stack_spec` needs Transformer Engine. This spec uses the local
`get_gpt_layer_local_submodules` pieces, split into HybridModel's layer kinds: `*` is
norm -> self-attention (GQA, optional QK-norm) -> residual, `-` is norm -> MLP -> residual.
A Qwen3 block is `*-`; a dense model is the pattern `*-` repeated.

It runs everywhere (CPU, any GPU) and is what the CPU backend tests exercise.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


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
    """HybridStack spec for `*` (attention) and `-` (MLP) layers without Transformer Engine.

    Mamba (`M`) layers come with the hybrid-model work; config validation refuses them until
    then (an unset layer kind would silently build as an identity).
    """
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
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=LocalNorm, mlp=full.mlp, mlp_bda=full.mlp_bda
        ),
    )
    return ModuleSpec(
        module=LocalHybridStack,
        submodules=HybridStackSubmodules(attention_layer=attention_layer, mlp_layer=mlp_layer),
    )
