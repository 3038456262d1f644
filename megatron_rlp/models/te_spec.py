"""The Transformer Engine HybridModel spec: Megatron-Core's own `hybrid_stack_spec`, adapted
for RLP in two places only.

Megatron's spec (`megatron.core.models.hybrid.hybrid_layer_specs.hybrid_stack_spec`) gives,
for the layer kinds this package builds:

- `*` attention: `TELayerNormColumnParallelLinear` for the input norm fused with QKV,
  `TEDotProductAttention` (cuDNN/flash attention), `TERowParallelLinear` out;
- `-` MLP: the norm fused into `linear_fc1` (`TELayerNormColumnParallelLinear`),
  `TERowParallelLinear` fc2;
- `M` Mamba-2: the norm fused into the mixer's `in_proj`, `TERowParallelLinear` out;
- `E` MoE: `MoETransformerLayer` with `TENorm`, and `get_moe_module_spec(use_te=True)`'s
  grouped-GEMM experts (its router given the padding-mask fix of `models.moe`);
- the stack's final norm: `TENorm` (Megatron's `HybridStack`).

What changes here, and why:

1. **QK-norm.** Megatron's hybrid spec has no `q_layernorm`/`k_layernorm` (Nemotron-H has
   none); Qwen3 needs them. They come from Megatron's `TESpecProvider().layer_norm(for_qk=True)`
   (`TENorm`, or Apex's `FusedLayerNorm` under TE < 1.9), exactly what Megatron's dense
   `get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=True)` uses.
2. **Mamba classes.** The mixer and layer stay this package's `LocalMambaMixer` /
   `LocalMambaLayer` (subclasses of Megatron's `MambaMixer` / `MambaLayer`, models/mamba/):
   RLP rollouts need their padding masks, batched static decoding and batch-on-dim-1 cache.
   Their projections are Megatron's TE ones above; the Mamba kernels are mamba_ssm's where it
   imports, else the pure-torch ones (models/mamba/adapter.py). `in_proj` draws its own
   initial weight (TE has no `keep_master_weight_for_test`), so under TE the initial model
   depends on the TP layout; conv, dt and A stay TP-invariant.

Layer kinds other than `*`, `-`, `M` and `E` are left unset, as in the local spec (config
validation refuses them). Without Transformer Engine the spec still *builds* (Megatron puts
placeholders where the TE classes would be) but no module can be instantiated from it;
models/provider.py selects it only when TE imports (backends/transformer_engine.py).
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rlp.models.mamba.mixer import LocalMambaLayer, LocalMambaMixer
from megatron_rlp.models.moe import with_masked_router


def megatron_te_hybrid_spec() -> ModuleSpec:
    """Megatron-Core's TE `hybrid_stack_spec` (importable without TE: placeholders then)."""
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    return hybrid_stack_spec


def te_qk_norm() -> type:
    """The QK-norm class Megatron's TE GPT spec uses (`TESpecProvider.layer_norm(for_qk=True)`)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider().layer_norm(for_qk=True)


def _with_submodules(spec: ModuleSpec, **changes) -> ModuleSpec:
    """A copy of `spec` whose submodules dataclass has `changes` (the original is Megatron's
    module-level spec and must not be mutated)."""
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))


def te_hybrid_stack_spec(qk_layernorm: bool) -> ModuleSpec:
    """HybridStack spec for `*`, `-`, `M` and `E` layers on Transformer Engine (see module doc).

    Args:
        qk_layernorm: add Megatron's TE QK-norm to attention (Qwen3).

    Returns:
        A ModuleSpec for `HybridModel(hybrid_stack_spec=...)`; the final norm is `TENorm`.
    """
    stock = megatron_te_hybrid_spec().submodules
    attention_layer = stock.attention_layer
    if qk_layernorm:
        norm = te_qk_norm()
        self_attention = _with_submodules(attention_layer.submodules.self_attention,
                                          q_layernorm=norm, k_layernorm=norm)
        attention_layer = _with_submodules(attention_layer, self_attention=self_attention)
    mamba = stock.mamba_layer
    mixer = dataclasses.replace(mamba.submodules.mixer, module=LocalMambaMixer)
    mamba_layer = dataclasses.replace(_with_submodules(mamba, mixer=mixer), module=LocalMambaLayer)
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(attention_layer=attention_layer,
                                         mlp_layer=stock.mlp_layer, mamba_layer=mamba_layer,
                                         moe_layer=_with_submodules(
                                             stock.moe_layer,
                                             mlp=with_masked_router(stock.moe_layer.submodules.mlp))),
    )
