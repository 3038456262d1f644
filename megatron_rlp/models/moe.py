"""MoE (`E`) layers from Megatron-Core's own parts, and their TransformerConfig fields.

An `E` layer of the hybrid pattern is Megatron's `MoETransformerLayer`: pre-MLP norm ->
`MoELayer` (a `TopKRouter`, a token dispatcher, the routed experts, an optional shared
expert) -> residual. The MoE module is `get_moe_module_spec`'s: with the local backend the
experts are a `SequentialMLP` of plain `ColumnParallelLinear`/`RowParallelLinear` MLPs (any
device, CPU included); with Transformer Engine they are TE's grouped GEMM (`TEGroupedMLP`), as
in Megatron's stock `hybrid_stack_spec`. A Qwen3-MoE model is the pattern `*E` repeated; a
Nemotron-3 hybrid interleaves `M`, `E` and a few `*`.

Nothing here is re-implemented: routing (softmax / sigmoid scores, expert bias, top-k scaling,
fp32 router), the aux / z losses (attached to the activations by `MoEAuxLossAutoScaler`, so
they reach the gradients at their coefficients through Megatron's schedules) and expert
parallelism are Megatron's. `transformer_config_moe` only translates config keys.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_rlp.config import ModelConfig
from megatron_rlp.models.seeded_init import seed_generator


class SeededSequentialMLP(SequentialMLP):
    """Megatron's `SequentialMLP` whose every expert draws its weights from a seed of its own.

    Under expert parallelism a rank builds only its `num_experts / EP` experts, so in build
    order rank 1's first expert would get the weights EP=1 gives expert 0. A base seed drawn
    from the (layout-independent) generator state on entry, with the global expert index,
    seeds each expert; the generator is left in a state that does not depend on EP either
    (the shared expert is built next). Same idea as `seeded_init.seed_layers_by_number`.
    """

    def __init__(self, num_local_experts: int, config, submodules, pg_collection=None,
                 name: str | None = None):
        base = int(torch.randint(0, 2**62, (1,)).item())  # same on every rank and layout
        first = pg_collection.ep.rank() * num_local_experts  # global index of expert 0 here
        super().__init__(0, config, submodules, pg_collection, name)  # everything but experts
        self.num_local_experts = num_local_experts
        for i in range(num_local_experts):  # SequentialMLP's own expert construction
            seed_generator(base, first + i + 1)
            self.local_experts.append(MLP(
                self.config, submodules, ffn_hidden_size=self.config.moe_ffn_hidden_size,
                is_expert=True, tp_group=pg_collection.expt_tp,
                name=(name + f".local_experts.{i}") if name is not None else None))
        seed_generator(base, 0)


class MaskedTopKRouter(TopKRouter):
    """Megatron's `TopKRouter`, with its expert-bias token count fixed for a `padding_mask`.

    Megatron-Core 0.19's `_apply_expert_bias` masks the [tokens, experts] routing map with the
    [tokens] padding mask without a trailing dimension (`routing_map & ~padding_mask`: a
    shape error whenever experts != tokens). The mask is given that dimension here; the aux
    and z losses already handle it.
    """

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1, 1)
        return super()._apply_expert_bias(routing_map, padding_mask)


def with_masked_router(mlp: partial) -> partial:
    """An `MoELayer` builder (as `get_moe_module_spec` returns) with `MaskedTopKRouter`."""
    moe = mlp.keywords["submodules"]
    return partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": dataclasses.replace(
        moe, router=MaskedTopKRouter)})


def local_moe_layer_spec(norm: type) -> ModuleSpec:
    """HybridStack `moe_layer` spec without Transformer Engine: `norm` -> MoELayer with local
    `SequentialMLP` experts -> residual (the TE spec uses Megatron's stock `moe_layer`, whose
    pre-MLP norm is likewise unfused: both store `pre_mlp_layernorm.weight`).

    Args:
        norm: the stack's norm class (`local_spec.LocalNorm`).
    """
    # num_experts only has to be set: the layer reads the count from TransformerConfig.
    mlp = get_moe_module_spec(use_te=False, num_experts=1, moe_grouped_gemm=False)
    moe = mlp.keywords["submodules"]
    experts = partial(SeededSequentialMLP, *moe.experts.args, **moe.experts.keywords)
    mlp = with_masked_router(partial(mlp.func, *mlp.args, **{
        **mlp.keywords, "submodules": dataclasses.replace(moe, experts=experts)}))
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=mlp,
                                              mlp_bda=get_bias_dropout_add),
    )


def transformer_config_moe(m: ModelConfig, use_te: bool) -> dict:
    """The MoE fields of Megatron's `TransformerConfig` for the `model.*` MoE keys ({} when
    the pattern has no `E` layer). Token dropping stays off unless a capacity factor is set;
    the dispatcher is `model.moe_token_dispatcher_type` (`alltoall` runs on gloo too)."""
    if "E" not in m.hybrid_layer_pattern:
        return {}
    balancing = m.moe_router_load_balancing_type
    return dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff if balancing != "none" else 0.0,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_dtype=m.moe_router_dtype,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_grouped_gemm=use_te,
        # Fused permute / router kernels are CUDA (TE) only.
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )
