"""MoE (`E`) layers: config keys refused with one line, Megatron's MoE layer built from the
local spec on CPU, and the router losses reaching the gradients at their coefficients."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

from megatron_rlp import distributed
from megatron_rlp.config import ConfigError, load_config
from megatron_rlp.models.provider import build_model

MOE = "examples/configs/tiny_moe_cpu.yaml"
TINY = ("model.hybrid_layer_pattern=*E", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.num_experts=4",
        "model.moe_ffn_hidden_size=16", "model.moe_z_loss_coeff=null")


@pytest.mark.parametrize("overrides,world,message", [
    (("model.moe_router_topk=9",), None, "model.moe_router_topk=9 (allowed: an integer in [1, "
     "num_experts=8])"),
    (("parallel.expert_model_parallel_size=3",), None,
     "parallel.expert_model_parallel_size=3 (allowed: a divisor of model.num_experts=8)"),
    (("parallel.expert_model_parallel_size=4",), 2, "EP*TP*PP dividing the world size 2"),
    (("model.moe_expert_capacity_factor=1.0",), None,
     "null with train.objective=rlp (exact on-policy routing"),
    (("model.num_experts=null",), None, "model.num_experts=None (allowed: an integer >= 1 "
     "with E layers"),
    (("model.hybrid_layer_pattern=*-",), None, "model.num_experts=8 (allowed: null without E"),
    (("model.moe_router_load_balancing_type=none",), None,
     "model.moe_aux_loss_coeff=0.001 (allowed: 0 with moe_router_load_balancing_type=none)"),
    (("model.moe_router_score_function=sigmoid", "model.moe_router_pre_softmax=true"), None,
     "model.moe_router_pre_softmax=True"),
    (("model.moe_router_topk=1",), None,
     "model.moe_router_topk=1 (allowed: > 1 with the softmax router unless "
     "moe_router_pre_softmax=true"),
    (("parallel.tensor_model_parallel_size=2",), None,
     "parallel.sequence_parallel=False (allowed: true with E (MoE) layers"),
    (("model.moe_router_score_function=sqrtsoftplus",), None,
     "model.moe_router_score_function='sqrtsoftplus' (allowed: one of"),
])
def test_moe_config_refusals(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        load_config(MOE, overrides, world_size=world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_moe_config_accepts_ep_layouts():
    cfg = load_config(MOE, ("parallel.expert_model_parallel_size=2",), world_size=2)
    assert cfg.parallel.expert_model_parallel_size == 2
    load_config(MOE, ("model.moe_expert_capacity_factor=1.0", "train.objective=ntp"))


def _router_grads(coeff: float, **extra) -> dict[str, torch.Tensor]:
    """Router gradients of a forward whose main loss is 0: only the aux loss drives them."""
    cfg = load_config(None, TINY + (f"model.moe_aux_loss_coeff={coeff}",)
                      + tuple(f"model.{k}={v}" for k, v in extra.items()))
    distributed.initialize(cfg)
    try:
        torch.manual_seed(0)
        model = build_model(cfg, 64)
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        tokens = torch.randint(0, 64, (2, 8))
        logits = model(tokens, torch.arange(8).expand(2, -1), None)
        (logits.float().sum() * 0).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}
    finally:
        distributed.shutdown()


def test_aux_loss_reaches_router_gradients_at_its_coefficient():
    one, two = _router_grads(1e-2), _router_grads(2e-2)
    assert one and all(g.abs().sum() > 0 for g in one.values())
    for n in one:
        torch.testing.assert_close(two[n], 2 * one[n])
    assert all(g.abs().sum() == 0 for g in _router_grads(0.0).values())


def test_moe_norm_is_not_an_old_local_name():
    """An E layer's `pre_mlp_layernorm` is stored so by both specs (TE's MoE layer keeps it
    unfused): an MoE checkpoint is not mistaken for one saved before the TE key map."""
    from megatron_rlp.interop.names import has_local_names

    moe = ["model.decoder.layers.1.pre_mlp_layernorm.weight",
           "model.decoder.layers.1.mlp.router.weight",
           "optimizer.state.exp_avg.model.decoder.layers.1.pre_mlp_layernorm.weight",
           "optimizer.state.exp_avg.model.decoder.layers.1.mlp.router.weight"]
    assert not has_local_names(moe)
    assert has_local_names(moe + ["model.decoder.layers.2.pre_mlp_layernorm.weight"])
    assert has_local_names(["model.decoder.layers.0.input_layernorm.weight"])
