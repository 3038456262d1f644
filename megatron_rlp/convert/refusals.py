"""What the converter does not model, refused with one line naming the field and the value.

Every Hugging Face config field that changes the forward is either mapped by mapping.py
(sizes, heads, head_dim, norm epsilon, RoPE theta, tied embeddings, the Nemotron-H layer
pattern and Mamba sizes, the MoE fields of moe_mapping.py) or listed here with the value the
project implements: a config that sets it to anything else is refused, since converting it
would silently give different logits (a YaRN `rope_scaling` converted as plain RoPE differed
from transformers by 0.145; a Nemotron-H `layer_norm_epsilon` of 1e-6 with Mamba layers by
0.018).

The same check runs on what `megatron-to-hf` writes: template keys are kept there, so a
template with, say, YaRN or a sliding window would describe a model the weights are not.

Fields that do not change the forward (token ids, `use_cache`, `torch_dtype`, initialisation
ranges, dropout-free training flags) are not listed and pass through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from megatron_rlp.convert.errors import ConversionError

_MISSING = object()


def _off(v: Any) -> bool:
    """False / 0 / None / empty: the feature is not used."""
    return v is None or v is False or v == 0 or v == [] or v == {}


def _is(expected: Any) -> Callable[[Any], bool]:
    return lambda v: v == expected


def _zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _time_step_limit(v: Any) -> bool:
    """Nemotron-H's dt clamp (0, inf) is no clamp; Megatron's mixer applies none."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return False
    lo, hi = v
    if isinstance(hi, dict):  # transformers 5 writes inf as {"__float__": "Infinity"}
        hi = hi.get("__float__")
    if isinstance(hi, str):
        hi = float(hi) if hi.lower() in ("inf", "infinity") else hi
    return lo in (0, 0.0) and (hi is None or (isinstance(hi, float) and math.isinf(hi) and hi > 0))


# (field, accepted value test, what is accepted): a field absent from config.json is accepted.
_COMMON = [
    ("attention_bias", _off, "false (no q/k/v/o biases)"),
    ("mlp_bias", _off, "false (no MLP biases)"),
    ("attention_dropout", _zero, "0.0"),
    ("hidden_dropout", _zero, "0.0"),
    ("partial_rotary_factor", _is(1.0), "1.0 (rotary on the whole head)"),
    ("pretraining_tp", lambda v: v in (None, 1), "1"),
    ("attn_logit_softcapping", _off, "null"),
    ("final_logit_softcapping", _off, "null"),
    ("logits_scaling", lambda v: v in (None, 1, 1.0), "1.0"),
    ("embedding_multiplier", lambda v: v in (None, 1, 1.0), "1.0"),
    ("sliding_window_pattern", _off, "null"),
    ("num_nextn_predict_layers", _off, "0 (multi-token-prediction layers are not modelled)"),
]
# A dense model with MoE settings is not what it looks like: refuse rather than guess.
_DENSE = "0 or absent (dense model; a Qwen3-MoE one has model_type qwen3_moe)"
_MOE = [
    ("num_experts", _off, _DENSE),
    ("num_local_experts", _off, _DENSE),
    ("num_experts_per_tok", _off, _DENSE),
    ("moe_intermediate_size", _off, _DENSE),
    ("n_routed_experts", _off, _DENSE),
    ("n_shared_experts", _off, _DENSE),
    ("mlp_only_layers", _off, _DENSE),
]
_QWEN3 = [
    ("hidden_act", _is("silu"), "silu (SwiGLU)"),
    ("use_sliding_window", _off, "false (full attention in every layer)"),
    ("layer_types", lambda v: all(t == "full_attention" for t in v or []),
     "full_attention for every layer"),
]
_NEMOTRON_H = [
    ("mlp_hidden_act", _is("relu2"), "relu2 (squared ReLU)"),
    ("use_bias", _off, "false"),
    ("sliding_window", _off, "null (full attention)"),
    ("mamba_hidden_act", _is("silu"), "silu"),
    ("conv_kernel", _is(4), "4 (Megatron's Mamba conv width)"),
    ("use_conv_bias", lambda v: v is True, "true (the conv1d bias is mapped)"),
    ("mamba_proj_bias", _off, "false"),
    ("time_step_limit", _time_step_limit, "[0.0, inf] (no dt clamp)"),
]
# Fields of other MoE families: a config with them is not the Qwen3-MoE it says it is.
_QWEN3_MOE = [
    ("shared_expert_intermediate_size", _off, "absent (Qwen3-MoE has no shared expert)"),
    ("n_shared_experts", _off, "absent (Qwen3-MoE has no shared expert)"),
    ("routed_scaling_factor", lambda v: v in (None, 1, 1.0), "1.0"),
]
# Nemotron-H writes its MoE defaults (n_routed_experts=8, ...) into every config, dense or
# not: they are checked (`_moe_refusals`) only when the layer pattern has `moe` layers.
TABLES = {"qwen3": _COMMON + _MOE + _QWEN3, "qwen3_moe": _COMMON + _QWEN3 + _QWEN3_MOE,
          "nemotron_h": _COMMON + _NEMOTRON_H}


def _nemotron_h_has(hf: dict, kind: str) -> bool:
    """Whether the layer list has a layer of `kind` ("M" or "E")."""
    names = {"M": ("mamba", "linear_attention"), "E": ("moe",)}[kind]
    return any(k in names for k in hf.get("layers_block_type") or []) \
        or kind in str(hf.get("hybrid_override_pattern") or "")


# Megatron's MambaMixer normalises its gated output with eps 1e-5, fixed (ssm/mamba_mixer.py);
# transformers' Nemotron-H uses `layer_norm_epsilon` there as in every other norm.
MAMBA_NORM_EPS = 1e-5


def _moe_refusals(hf: dict, arch: str) -> list[str]:
    """MoE settings Megatron's router and experts cannot express (moe_mapping.py: the
    routing of each family and Megatron's)."""
    errors = []
    if arch == "qwen3_moe":
        experts = hf.get("num_experts", hf.get("num_local_experts")) or 0
        if not experts:
            return errors
    elif arch == "nemotron_h" and _nemotron_h_has(hf, "E"):
        experts = hf.get("n_routed_experts") or 0
        if hf.get("moe_latent_size") is not None:
            errors.append(f"moe_latent_size={hf['moe_latent_size']!r} (allowed: null; the "
                          "latent projections around the experts are not modelled)")
        groups, top = hf.get("n_group", 1), hf.get("topk_group", 1)
        if groups != top:
            errors.append(f"n_group={groups!r} with topk_group={top!r} (allowed: topk_group = "
                          "n_group, every group kept; group-limited routing is not modelled)")
        if hf.get("n_shared_experts", 1) != 1:
            errors.append(f"n_shared_experts={hf['n_shared_experts']!r} (allowed: 1; "
                          "transformers builds one shared expert of "
                          "moe_shared_expert_intermediate_size whatever the count)")
        if not hf.get("moe_shared_expert_intermediate_size"):
            errors.append(f"moe_shared_expert_intermediate_size="
                          f"{hf.get('moe_shared_expert_intermediate_size')!r} (allowed: > 0)")
        k, norm = hf.get("num_experts_per_tok"), hf.get("norm_topk_prob", True)
        if isinstance(k, int) and bool(norm) != (k > 1):
            errors.append(f"norm_topk_prob={norm!r} with num_experts_per_tok={k} (allowed: "
                          f"{k > 1}; Megatron's sigmoid router normalises the chosen scores "
                          "exactly when top-k > 1)")
        factor = hf.get("routed_scaling_factor", 1.0)
        if not (isinstance(factor, (int, float)) and 0 < factor < math.inf):
            errors.append(f"routed_scaling_factor={factor!r} (allowed: a number > 0)")
    else:
        return errors
    k = hf.get("num_experts_per_tok")
    if not (isinstance(k, int) and isinstance(experts, int) and 1 <= k <= experts):
        errors.append(f"num_experts_per_tok={k!r} (allowed: an integer in [1, {experts}], the "
                      "routed experts)")
    if not hf.get("moe_intermediate_size"):
        errors.append(f"moe_intermediate_size={hf.get('moe_intermediate_size')!r} "
                      "(allowed: > 0)")
    return errors


def _rope_refusals(hf: dict) -> list[str]:
    """Both `rope_scaling` (transformers 4) and `rope_parameters` (transformers 5, possibly one
    dict per layer type) must describe the default RoPE: either one alone decides the forward
    in some transformers version."""
    errors = []
    for field in ("rope_scaling", "rope_parameters"):
        value = hf.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            errors.append(f"{field}={value!r} (allowed: null or a dict with rope_type default)")
            continue
        nested = value and all(isinstance(v, dict) for v in value.values())
        for where, params in (value.items() if nested else [("", value)]):
            name = f"{field}[{where!r}]" if where else field
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in (None, "default"):
                errors.append(f"{name}.rope_type={kind!r} (allowed: 'default'; the project "
                              "implements plain RoPE only)")
            factor = params.get("partial_rotary_factor", 1.0)
            if factor != 1.0:
                errors.append(f"{name}.partial_rotary_factor={factor!r} (allowed: 1.0)")
            if kind in (None, "default") and params.get("factor", 1.0) not in (1, 1.0):
                errors.append(f"{name}.factor={params['factor']!r} (allowed: 1.0 with the "
                              "default RoPE)")
    return errors


def refusals(hf: dict, arch: str) -> list[str]:
    """Every `field=value (allowed: ...)` of config.json `hf` that `arch` does not model."""
    errors = []
    for field, ok, allowed in TABLES[arch]:
        value = hf.get(field, _MISSING)
        if value is not _MISSING and not ok(value):
            errors.append(f"{field}={value!r} (allowed: {allowed})")
    errors += _moe_refusals(hf, arch)
    if arch.startswith("qwen3"):
        errors += _rope_refusals(hf)
    else:  # NoPE: a rotary setting would be ignored by the Megatron model
        kind = hf.get("position_embedding_type")
        if kind not in (None, "none"):
            errors.append(f"position_embedding_type={kind!r} (allowed: none; Nemotron-H "
                          "layers use no positional embedding)")
        eps = hf.get("layer_norm_epsilon", MAMBA_NORM_EPS)
        if _nemotron_h_has(hf, "M") and eps != MAMBA_NORM_EPS:
            errors.append(f"layer_norm_epsilon={eps!r} with Mamba layers (allowed: "
                          f"{MAMBA_NORM_EPS}; Megatron's Mamba mixer normalises with eps "
                          f"{MAMBA_NORM_EPS}, transformers' with layer_norm_epsilon)")
    return errors


def check_hf_config(hf: dict, arch: str, direction: str = "hf-to-megatron") -> None:
    """Raise ConversionError with one line naming the first field the converter would drop.

    Args:
        hf: a config.json as a dict.
        arch: "qwen3", "qwen3_moe" or "nemotron_h" (`mapping.architecture_of_hf`).
        direction: for the message: which conversion refused it.
    """
    errors = refusals(hf, arch)
    if errors:
        more = f" (and {len(errors) - 1} more: {'; '.join(errors[1:])})" if len(errors) > 1 else ""
        raise ConversionError(f"{direction}: {arch} config field {errors[0]}{more} — not "
                              f"modelled by the converter, refused rather than converted "
                              "to a different forward")


def check_megatron_model(m: dict, arch: str) -> None:
    """The Megatron side of an export: `ModelConfig` fields an HF `arch` config cannot say."""
    qwen3 = dict(normalization="RMSNorm", position_embedding_type="rope", activation="swiglu",
                 qk_layernorm=True)
    wants = {"qwen3": qwen3, "qwen3_moe": qwen3,
             "nemotron_h": dict(normalization="RMSNorm", position_embedding_type="none",
                                activation="squared_relu", qk_layernorm=False)}[arch]
    if "E" in m.get("hybrid_layer_pattern", ""):
        wants = {**wants, **_MEGATRON_MOE[arch], "moe_expert_capacity_factor": None}
    for key, want in wants.items():
        if m.get(key, want) != want:
            raise ConversionError(f"megatron-to-hf: model.{key}={m[key]!r} (allowed for "
                                  f"{arch}: {want!r}; the HF architecture has no such option)")
    if arch == "nemotron_h" and "M" in m.get("hybrid_layer_pattern", "") \
            and m.get("norm_epsilon") != MAMBA_NORM_EPS:
        raise ConversionError(f"megatron-to-hf: model.norm_epsilon={m['norm_epsilon']!r} with "
                              f"M layers (allowed for nemotron_h: {MAMBA_NORM_EPS}; transformers "
                              "normalises the Mamba mixer's output with it, Megatron with "
                              f"{MAMBA_NORM_EPS} whatever the setting)")
    if arch == "nemotron_h" and "E" in m.get("hybrid_layer_pattern", "") \
            and not m.get("moe_shared_expert_intermediate_size"):
        raise ConversionError("megatron-to-hf: model.moe_shared_expert_intermediate_size=None "
                              "(allowed for nemotron_h: > 0; its MoE layers always have a "
                              "shared expert)")
    if arch == "qwen3_moe" and m.get("moe_router_topk_scaling_factor") not in (None, 1.0):
        raise ConversionError(f"megatron-to-hf: model.moe_router_topk_scaling_factor="
                              f"{m['moe_router_topk_scaling_factor']!r} (allowed for qwen3_moe: "
                              "null or 1.0; the HF architecture has no such option)")


# The Megatron router settings each HF MoE family's router computes (moe_mapping.py).
_MEGATRON_MOE = {
    "qwen3_moe": dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                      moe_shared_expert_intermediate_size=None),
    "nemotron_h": dict(moe_router_score_function="sigmoid"),
}
