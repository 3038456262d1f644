"""RLP steps on tiny MoE models on one rank (gloo, CPU): the update's metrics carry the router
losses, expert load, dropped tokens and `routing_agreement`, which is exactly 1.0 in fp32
(the rollout's decode steps route every thought token as the update's forward does), for the
packed and the unpacked update; the EMA teacher holds and follows every expert."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.data import ContextSampler
from megatron_rlp.train.builder import build_state
from megatron_rlp.train.rlp_step import rlp_step
from megatron_rlp.train.timers import PhaseTimer

SMALL = ("model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.max_sequence_length=64", "model.num_experts=4",
         "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
         "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=6",
         "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32", "rlp.ema_decay=0.9",
         "optimizer.lr=1e-2", "train.seed=7")
MODELS = {
    # Qwen3-MoE style: softmax router, aux loss and z-loss
    "moe": ("examples/configs/tiny_moe_cpu.yaml", ("model.hybrid_layer_pattern=*E*E",)),
    # Nemotron-3 style: Mamba + attention + MoE, sigmoid router with expert bias, scaling
    # factor, sequence aux loss, a shared expert
    "hybrid-moe": ("examples/configs/tiny_hybrid_moe_cpu.yaml", (
        "model.hybrid_layer_pattern=ME*E", "model.mamba_num_heads=4", "model.mamba_head_dim=32",
        "model.mamba_state_dim=8", "model.moe_shared_expert_intermediate_size=64")),
}


@pytest.fixture(scope="module", params=list(MODELS))
def moe_state(request):
    path, overrides = MODELS[request.param]
    cfg = load_config(path, SMALL + overrides, world_size=1)
    distributed.initialize(cfg)
    yield request.param, build_state(cfg)
    distributed.shutdown()


def _experts(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "experts" in n}


def test_moe_rlp_steps(moe_state):
    kind, state = moe_state
    cfg = state.cfg
    sampler = ContextSampler(state.corpus, cfg.rlp.min_prefix_tokens, cfg.rlp.max_prefix_tokens,
                             cfg.train.seed)
    theta0 = _experts(state.policy)
    for share_prefixes in (True, False):  # the packed update, then the unpacked one
        cfg.rlp.share_prefixes = share_prefixes
        metrics = rlp_step(state, sampler, PhaseTimer())
        assert metrics["skipped"] == 0.0 and math.isfinite(metrics["loss"])
        assert metrics["routing_agreement"] == 1.0, (share_prefixes, metrics)
        assert metrics["moe_dropped_fraction"] == 0.0
        assert metrics["moe_expert_load_max"] >= 1.0
        aux = ("moe_load_balancing_loss" if kind == "moe" else "moe_seq_load_balancing_loss")
        assert math.isfinite(metrics[aux]) and metrics[aux] > 0
        assert ("moe_z_loss" in metrics) == (cfg.model.moe_z_loss_coeff is not None)
    # Every expert of every E layer is in the policy and in the EMA teacher, and moved.
    n_moe = cfg.model.hybrid_layer_pattern.count("E")
    fc1 = [n for n in theta0 if "local_experts" in n and n.endswith("linear_fc1.weight")]
    assert len(fc1) == n_moe * cfg.model.num_experts
    theta2, phi2 = _experts(state.policy), _experts(state.teacher.model)
    assert phi2.keys() == theta2.keys() == theta0.keys()
    assert all(not torch.equal(phi2[n], theta0[n]) for n in fc1), "teacher misses an expert"
    if cfg.model.moe_router_enable_expert_bias:  # routing state: the teacher follows it too
        bias = {n: b for n, b in state.policy.named_buffers() if n.endswith("expert_bias")}
        teacher = dict(state.teacher.model.named_buffers())
        assert bias and any(bool(b.abs().sum() > 0) for b in bias.values())
        for n in bias:
            assert teacher[n.removeprefix("module.")].abs().sum() > 0
