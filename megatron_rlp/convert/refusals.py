"""What the converter does not model, refused with one line naming the field and the value.

Every Hugging Face config field that changes the forward is either mapped by mapping.py
(sizes, heads, head_dim, norm epsilon, RoPE theta, tied embeddings, the Nemotron-H layer
pattern and Mamba sizes) or listed here with the value the project implements: a config that
sets it to anything else is refused, since converting it would silently give different
logits (a YaRN `rope_scaling` converted as plain RoPE differed from transformers by 0.145).

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
_MOE = [
    ("num_experts", _off, "0 or absent (dense model; MoE layers are not modelled)"),
    ("num_local_experts", _off, "0 or absent (dense model; MoE layers are not modelled)"),
    ("num_experts_per_tok", _off, "0 or absent (dense model; MoE layers are not modelled)"),
    ("moe_intermediate_size", _off, "0 or absent (dense model; MoE layers are not modelled)"),
    ("n_routed_experts", _off, "0 or absent (dense model; MoE layers are not modelled)"),
    ("n_shared_experts", _off, "0 or absent (dense model; MoE layers are not modelled)"),
    ("mlp_only_layers", _off, "empty (dense model; MoE layers are not modelled)"),
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
# Nemotron-H writes its MoE defaults (n_routed_experts=8, ...) into every config, dense or
# not: there MoE is refused through the layer pattern (`E` layers), not these fields.
TABLES = {"qwen3": _COMMON + _MOE + _QWEN3, "nemotron_h": _COMMON + _NEMOTRON_H}


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
    if arch == "qwen3":
        errors += _rope_refusals(hf)
    else:  # NoPE: a rotary setting would be ignored by the Megatron model
        kind = hf.get("position_embedding_type")
        if kind not in (None, "none"):
            errors.append(f"position_embedding_type={kind!r} (allowed: none; Nemotron-H "
                          "layers use no positional embedding)")
    return errors


def check_hf_config(hf: dict, arch: str, direction: str = "hf-to-megatron") -> None:
    """Raise ConversionError with one line naming the first field the converter would drop.

    Args:
        hf: a config.json as a dict.
        arch: "qwen3" or "nemotron_h" (`mapping.architecture_of_hf`).
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
    wants = {"qwen3": dict(normalization="RMSNorm", position_embedding_type="rope",
                           activation="swiglu", qk_layernorm=True),
             "nemotron_h": dict(normalization="RMSNorm", position_embedding_type="none",
                                activation="squared_relu", qk_layernorm=False)}[arch]
    for key, want in wants.items():
        if m.get(key, want) != want:
            raise ConversionError(f"megatron-to-hf: model.{key}={m[key]!r} (allowed for "
                                  f"{arch}: {want!r}; the HF architecture has no such option)")
