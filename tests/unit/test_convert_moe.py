"""The MoE conversion's router mapping (megatron_rlp/convert/moe_mapping.py): transformers'
Qwen3-MoE and Nemotron-H routers give the same experts and weights as Megatron's
`topk_routing_with_score_function` with the fields the converter maps them to; the one
setting Megatron cannot express (a sigmoid router that does not normalise its top-k > 1) is
shown to differ, which is why it is refused."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

from megatron_rlp.convert.moe_mapping import (
    nemotron_h_moe_fields,
    nemotron_h_moe_hf_fields,
    qwen3_moe_fields,
    qwen3_moe_hf_fields,
)

pytest.importorskip("transformers")
EXPERTS, HIDDEN, TOKENS = 8, 16, 64


def hf_probs(router, x: torch.Tensor) -> torch.Tensor:
    """transformers' router output as a dense [tokens, experts] weight matrix."""
    _, weights, indices = router(x)
    return torch.zeros(x.shape[0], EXPERTS).scatter(1, indices, weights.float())


def megatron_probs(fields: dict, logits: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    probs, _ = topk_routing_with_score_function(
        logits, fields["moe_router_topk"],
        use_pre_softmax=fields.get("moe_router_pre_softmax", False),
        scaling_factor=fields.get("moe_router_topk_scaling_factor"),
        score_function=fields["moe_router_score_function"],
        expert_bias=bias if fields.get("moe_router_enable_expert_bias") else None)
    return probs


@pytest.mark.parametrize("topk, norm", [(2, True), (2, False), (1, True), (3, False)])
def test_qwen3_moe_router_is_megatrons_softmax_router(topk, norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hf = dict(num_hidden_layers=1, num_experts=EXPERTS, num_experts_per_tok=topk,
              moe_intermediate_size=8, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=HIDDEN, **hf))
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(TOKENS, HIDDEN)
        fields = qwen3_moe_fields(hf)
        assert fields["moe_router_pre_softmax"] is (not norm)
        got = megatron_probs(fields, x @ router.weight.T, None)
        torch.testing.assert_close(got, hf_probs(router, x), atol=1e-6, rtol=0)
    m = {**fields, "ffn_hidden_size": 32, "moe_aux_loss_coeff": 0.0}
    assert qwen3_moe_hf_fields(m, {})["norm_topk_prob"] is norm  # and back


@pytest.mark.parametrize("topk, scale", [(2, 2.5), (6, 1.0), (1, 2.5)])
def test_nemotron_h_router_is_megatrons_sigmoid_router_with_expert_bias(topk, scale):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    hf = dict(n_routed_experts=EXPERTS, num_experts_per_tok=topk, moe_intermediate_size=8,
              moe_shared_expert_intermediate_size=16, routed_scaling_factor=scale,
              norm_topk_prob=topk > 1)
    router = NemotronHTopkRouter(NemotronHConfig(hidden_size=HIDDEN, **hf))
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.5)  # large enough to change choices
        x = torch.randn(TOKENS, HIDDEN)
        fields = nemotron_h_moe_fields(hf)
        logits = x @ router.weight.T
        got = megatron_probs(fields, logits, router.e_score_correction_bias)
        want = hf_probs(router, x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        # the bias decided some choices: without it the experts differ
        unbiased = megatron_probs({**fields, "moe_router_enable_expert_bias": False}, logits,
                                  None)
        assert not torch.equal(unbiased != 0, want != 0)
    m = {**fields, "ffn_hidden_size": 32}
    back = nemotron_h_moe_hf_fields(m)
    assert {k: back[k] for k in hf} == hf  # and back


def test_sigmoid_router_without_normalisation_is_what_megatron_cannot_do():
    """norm_topk_prob=false with top-k > 1: transformers keeps the raw sigmoid scores,
    Megatron normalises them (refusals.py refuses the config)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    hf = dict(n_routed_experts=EXPERTS, num_experts_per_tok=2, norm_topk_prob=False,
              moe_intermediate_size=8, moe_shared_expert_intermediate_size=16)
    router = NemotronHTopkRouter(NemotronHConfig(hidden_size=HIDDEN, **hf))
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(TOKENS, HIDDEN)
        got = megatron_probs(nemotron_h_moe_fields(hf), x @ router.weight.T,
                             router.e_score_correction_bias)
        assert not torch.allclose(got, hf_probs(router, x), atol=1e-3)
