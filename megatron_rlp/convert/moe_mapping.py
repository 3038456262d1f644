"""Mixture-of-experts layers in the HF <-> Megatron conversion: Qwen3-MoE
(`Qwen3MoeForCausalLM`) and Nemotron-H `moe` layers (Nemotron 3 Nano). mapping.py calls these
for every `E` layer; refusals.py refuses what they cannot express.

Megatron side (an `E` layer i with local experts, models/moe.py; TP=1 = EP=1 layout):
    decoder.layers.i.pre_mlp_layernorm.weight
    decoder.layers.i.mlp.router.weight                     [experts, hidden]
    decoder.layers.i.mlp.router.expert_bias                [experts] (expert bias on)
    decoder.layers.i.mlp.experts.local_experts.K.linear_fc1.weight  ([gate; up] for SwiGLU,
        else up: [(2x) moe_ffn_hidden_size, hidden]), ...linear_fc2.weight [hidden, ffn]
    decoder.layers.i.mlp.shared_experts.linear_fc{1,2}.weight  (shared expert set)

Hugging Face side, as transformers saves it (one tensor per expert; transformers >= 5 holds
them stacked in memory, `experts.gate_up_proj` [E, 2I, H] / `experts.up_proj` [E, I, H] and
`experts.down_proj` [E, H, I]: both spellings are read, the saved one is written):
    Qwen3-MoE layer l (`model.layers.l.`): post_attention_layernorm.weight, mlp.gate.weight,
        mlp.experts.K.{gate,up,down}_proj.weight
    Nemotron-H layer i (`backbone.layers.i.`): norm.weight, mixer.gate.weight,
        mixer.gate.e_score_correction_bias, mixer.experts.K.{up,down}_proj.weight,
        mixer.shared_experts.{up,down}_proj.weight

Routing (transformers' `Qwen3MoeTopKRouter` / `NemotronHTopkRouter` against Megatron's
`topk_routing_with_score_function`; checked in tests/unit/test_convert_moe.py):
- Qwen3-MoE: softmax over all experts, top-k, the k weights renormalised when
  `norm_topk_prob`. Megatron's softmax router without pre-softmax takes the top-k logits and
  a softmax over those k: the same weights, so `norm_topk_prob=true` <->
  `moe_router_pre_softmax=false`; `false` <-> `moe_router_pre_softmax=true` (softmax over
  all, top-k, no renormalisation).
- Nemotron-H: sigmoid scores of fp32 logits, `e_score_correction_bias` added for the choice
  only, the chosen scores normalised when `norm_topk_prob`, times `routed_scaling_factor`.
  Megatron's sigmoid router with `moe_router_dtype=fp32` and its expert bias does the same,
  but normalises exactly when top-k > 1, so `norm_topk_prob` must equal `top-k > 1`. A
  Megatron model without an expert bias exports a zero correction bias (the same choice).
  transformers always builds one shared expert of `moe_shared_expert_intermediate_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlp.convert.errors import take


@dataclass(frozen=True)
class MoELayout:
    """Where one family keeps an MoE layer's weights (suffixes of the HF layer prefix)."""

    norm: str
    router: str
    experts: str
    gated: bool  # SwiGLU experts (gate_proj + up_proj) or plain (up_proj)
    bias: str | None = None  # the router's selection bias
    shared: str | None = None  # the shared expert's module


QWEN3_MOE = MoELayout(norm="post_attention_layernorm.weight", router="mlp.gate.weight",
                      experts="mlp.experts.", gated=True)
NEMOTRON_H_MOE = MoELayout(norm="norm.weight", router="mixer.gate.weight",
                           experts="mixer.experts.", gated=False,
                           bias="mixer.gate.e_score_correction_bias",
                           shared="mixer.shared_experts.")


# ---------------------------------------------------------------------------------------
# Config fields


def qwen3_moe_num_experts(hf: dict) -> int:
    """Routed experts of a Qwen3-MoE config.json (`num_experts`, which transformers 5 writes
    as `num_local_experts`)."""
    return int(hf.get("num_experts", hf.get("num_local_experts")) or 0)


def qwen3_moe_pattern(hf: dict) -> str:
    """`*E` per MoE layer, `*-` per dense one, as transformers' `Qwen3MoeDecoderLayer` picks:
    MoE unless in `mlp_only_layers`, when experts > 0 and (l + 1) % decoder_sparse_step == 0."""
    experts = qwen3_moe_num_experts(hf)
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    return "".join("*E" if layer not in dense and experts > 0 and (layer + 1) % step == 0
                   else "*-" for layer in range(int(hf["num_hidden_layers"])))


def qwen3_moe_fields(hf: dict) -> dict:
    """Qwen3-MoE config.json -> the MoE `ModelConfig` fields (pattern included)."""
    pattern = qwen3_moe_pattern(hf)
    if "E" not in pattern:
        return dict(hybrid_layer_pattern=pattern)
    return dict(
        hybrid_layer_pattern=pattern,
        num_experts=qwen3_moe_num_experts(hf),
        moe_router_topk=int(hf["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0),
    )


def qwen3_moe_hf_fields(m: dict, template: dict) -> dict:
    """The MoE part of a Qwen3-MoE config.json for `ModelConfig` fields `m` (experts under
    the key(s) `template` uses: `num_experts`, `num_local_experts`, or `num_experts`)."""
    pattern = m["hybrid_layer_pattern"].replace("|", "")
    out = dict(
        decoder_sparse_step=1,
        mlp_only_layers=[layer for layer in range(len(pattern) // 2)
                         if pattern[2 * layer + 1] == "-"],
        num_experts_per_tok=m["moe_router_topk"],
        moe_intermediate_size=m["moe_ffn_hidden_size"] or m["ffn_hidden_size"],
        norm_topk_prob=not m["moe_router_pre_softmax"],
        router_aux_loss_coef=m["moe_aux_loss_coeff"],
    )
    for key in [k for k in ("num_experts", "num_local_experts") if k in template] \
            or ["num_experts"]:
        out[key] = m["num_experts"]
    return out


def nemotron_h_moe_fields(hf: dict) -> dict:
    """Nemotron-H config.json with `moe` layers -> the MoE `ModelConfig` fields."""
    return dict(
        num_experts=int(hf["n_routed_experts"]),
        moe_router_topk=int(hf["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        moe_shared_expert_intermediate_size=int(hf["moe_shared_expert_intermediate_size"]),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,  # e_score_correction_bias is always there
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        moe_router_dtype="fp32",  # transformers' router computes its logits in fp32
    )


def nemotron_h_moe_hf_fields(m: dict) -> dict:
    """The MoE part of a Nemotron-H config.json for `ModelConfig` fields `m`."""
    return dict(
        n_routed_experts=m["num_experts"], num_experts_per_tok=m["moe_router_topk"],
        moe_intermediate_size=m["moe_ffn_hidden_size"] or m["ffn_hidden_size"],
        moe_shared_expert_intermediate_size=m["moe_shared_expert_intermediate_size"],
        n_shared_experts=1, moe_latent_size=None,
        routed_scaling_factor=float(m["moe_router_topk_scaling_factor"] or 1.0),
        n_group=1, topk_group=1, norm_topk_prob=m["moe_router_topk"] > 1,
    )


# ---------------------------------------------------------------------------------------
# Weights


def _hf_experts(sd: dict[str, Tensor], p: str, n: int, gated: bool
                ) -> tuple[list[Tensor], list[Tensor]]:
    """Per expert, Megatron's linear_fc1 ([gate; up] when gated) and linear_fc2 weights."""
    if p + "down_proj" in sd:  # transformers' in-memory (stacked) format
        fc1 = take(sd, p + ("gate_up_proj" if gated else "up_proj"))
        fc2 = take(sd, p + "down_proj")
        return list(fc1.unbind(0)), list(fc2.unbind(0))
    fc1, fc2 = [], []
    for k in range(n):
        up = take(sd, f"{p}{k}.up_proj.weight")
        fc1.append(torch.cat([take(sd, f"{p}{k}.gate_proj.weight"), up], 0) if gated else up)
        fc2.append(take(sd, f"{p}{k}.down_proj.weight"))
    return fc1, fc2


def moe_to_megatron(sd: dict[str, Tensor], h: str, g: str, m: dict, layout: MoELayout
                    ) -> dict[str, Tensor]:
    """One HF MoE layer (prefix `h`, weights taken out of `sd`) -> Megatron's `E` layer `g`."""
    out = {g + "pre_mlp_layernorm.weight": take(sd, h + layout.norm),
           g + "mlp.router.weight": take(sd, h + layout.router)}
    if layout.bias is not None:
        bias = take(sd, h + layout.bias)
        if m.get("moe_router_enable_expert_bias"):
            out[g + "mlp.router.expert_bias"] = bias.float()  # Megatron keeps it in fp32
    fc1, fc2 = _hf_experts(sd, h + layout.experts, m["num_experts"], layout.gated)
    for k, (w1, w2) in enumerate(zip(fc1, fc2, strict=True)):
        out[g + f"mlp.experts.local_experts.{k}.linear_fc1.weight"] = w1
        out[g + f"mlp.experts.local_experts.{k}.linear_fc2.weight"] = w2
    if layout.shared is not None:
        out[g + "mlp.shared_experts.linear_fc1.weight"] = take(sd, h + layout.shared
                                                               + "up_proj.weight")
        out[g + "mlp.shared_experts.linear_fc2.weight"] = take(sd, h + layout.shared
                                                               + "down_proj.weight")
    return out


def moe_to_hf(sd: dict[str, Tensor], h: str, g: str, m: dict, layout: MoELayout
              ) -> dict[str, Tensor]:
    """Megatron's `E` layer `g` (weights taken out of `sd`) -> one HF MoE layer `h`, one
    tensor per expert as transformers saves it."""
    out = {h + layout.norm: take(sd, g + "pre_mlp_layernorm.weight"),
           h + layout.router: take(sd, g + "mlp.router.weight")}
    if layout.bias is not None:
        key = g + "mlp.router.expert_bias"
        out[h + layout.bias] = take(sd, key) if key in sd else torch.zeros(m["num_experts"])
    p = h + layout.experts
    for k in range(m["num_experts"]):
        fc1 = take(sd, g + f"mlp.experts.local_experts.{k}.linear_fc1.weight")
        if layout.gated:
            gate, up = fc1.chunk(2, 0)
            out[f"{p}{k}.gate_proj.weight"] = gate.contiguous()
            out[f"{p}{k}.up_proj.weight"] = up.contiguous()
        else:
            out[f"{p}{k}.up_proj.weight"] = fc1
        out[f"{p}{k}.down_proj.weight"] = take(sd, g + f"mlp.experts.local_experts.{k}"
                                                   ".linear_fc2.weight")
    if layout.shared is not None:
        out[h + layout.shared + "up_proj.weight"] = take(sd, g + "mlp.shared_experts"
                                                             ".linear_fc1.weight")
        out[h + layout.shared + "down_proj.weight"] = take(sd, g + "mlp.shared_experts"
                                                               ".linear_fc2.weight")
    return out
