"""Weight and config mappings between Hugging Face checkpoints and this project's Megatron
`HybridModel` (local spec, TP=1 layout; dist_checkpointing reshards to any TP/PP at load).

Megatron side (keys of `HybridModel.state_dict()`, see models/local_spec.py):
    embedding.word_embeddings.weight, decoder.final_norm.weight, output_layer.weight (untied)
    `*` layer i: decoder.layers.i.input_layernorm.weight,
                 decoder.layers.i.self_attention.linear_qkv.weight  (per query group: its q
                     heads, then k, then v: [groups * (heads/groups + 2) * head_dim, hidden]),
                 decoder.layers.i.self_attention.{q,k}_layernorm.weight (QK-norm),
                 decoder.layers.i.self_attention.linear_proj.weight
    `-` layer i: decoder.layers.i.pre_mlp_layernorm.weight,
                 decoder.layers.i.mlp.linear_fc1.weight ([gate; up] when gated (SwiGLU), else
                     up), decoder.layers.i.mlp.linear_fc2.weight
    `M` layer i: decoder.layers.i.norm.weight, decoder.layers.i.mixer.{in_proj.weight,
                 conv1d_weight, conv1d_bias, dt_bias, A_log, D, norm.weight, out_proj.weight}
                 (Megatron's MambaLayer/MambaMixer names; see NEMOTRON_H_MAMBA below)
    `E` layer i: router, experts, shared expert (moe_mapping.py)

Qwen3 (dense, `Qwen3ForCausalLM`): HF layer l is Megatron layers 2l (`*`) and 2l+1 (`-`).
Qwen3-MoE (`Qwen3MoeForCausalLM`): the same, layer 2l+1 an `E` (or a `-` for its dense
layers: `mlp_only_layers`, `decoder_sparse_step`).
Nemotron-H (`NemotronHForCausalLM`, published weights under `backbone.`): HF layer i is
Megatron layer i, its kind given by `hybrid_override_pattern` / `layers_block_type`
(M / * / - / E).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from megatron_rlp.convert.errors import ConversionError
from megatron_rlp.convert.errors import take as _take
from megatron_rlp.convert.moe_mapping import (
    NEMOTRON_H_MOE,
    QWEN3_MOE,
    moe_to_hf,
    moe_to_megatron,
    nemotron_h_moe_fields,
    nemotron_h_moe_hf_fields,
    qwen3_moe_fields,
    qwen3_moe_hf_fields,
)
from megatron_rlp.convert.refusals import check_hf_config

# ---------------------------------------------------------------------------------------
# Shared pieces


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int, head_dim: int) -> Tensor:
    """HF q/k/v projections -> Megatron's fused linear_qkv (grouped by query group)."""
    hidden = q.shape[1]
    q = q.reshape(groups, -1, hidden)
    k = k.reshape(groups, head_dim, hidden)
    v = v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def unpack_qkv(qkv: Tensor, heads: int, groups: int, head_dim: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron's linear_qkv -> HF q, k, v projections."""
    hidden = qkv.shape[1]
    per = heads // groups
    x = qkv.reshape(groups, (per + 2) * head_dim, hidden)
    q = x[:, :per * head_dim].reshape(-1, hidden)
    k = x[:, per * head_dim:(per + 1) * head_dim].reshape(-1, hidden)
    v = x[:, (per + 1) * head_dim:].reshape(-1, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _rope_theta(hf: dict) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta`; the RoPE type of
    both `rope_parameters` and `rope_scaling` is checked by refusals.py first."""
    rope = hf.get("rope_parameters") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # one dict per layer type
        rope = rope.get("full_attention") or next(iter(rope.values()))
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check(hf: dict, arch: str) -> None:
    check_hf_config(hf, arch)


# ---------------------------------------------------------------------------------------
# Qwen3 (dense)


def qwen3_model_config(hf: dict) -> dict:
    """HF Qwen3 config.json -> `ModelConfig` fields (refusals.py: what is not modelled)."""
    _check(hf, "qwen3")
    return _qwen3_fields(hf)


def qwen3_moe_model_config(hf: dict) -> dict:
    """HF Qwen3-MoE config.json -> `ModelConfig` fields (moe_mapping.py: the MoE part)."""
    _check(hf, "qwen3_moe")
    return {**_qwen3_fields(hf, "qwen3_moe"), **qwen3_moe_fields(hf)}


def _qwen3_fields(hf: dict, name: str = "qwen3") -> dict:
    theta = _rope_theta(hf)
    if theta != int(theta):
        raise ConversionError(f"rope_theta={theta} is not an integer (model.rotary_base)")
    layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    return dict(
        name=str(hf.get("_name_or_path") or name) or name,
        hybrid_layer_pattern="*-" * layers,
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        qk_layernorm=True,
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=int(theta),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        max_sequence_length=int(hf.get("max_position_embeddings", 32768)),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


def qwen3_hf_config(m: dict, vocab_size: int, template: dict | None = None) -> dict:
    """`ModelConfig` fields -> HF Qwen3 config.json (keys of `template` kept where not set)."""
    layers = len(m["hybrid_layer_pattern"].replace("|", "")) // 2
    head_dim = m["kv_channels"] or m["hidden_size"] // m["num_attention_heads"]
    cfg = dict(template or {})
    cfg.update(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=vocab_size,
        hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=layers, num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_query_groups"], head_dim=head_dim, hidden_act="silu",
        max_position_embeddings=m["max_sequence_length"], rms_norm_eps=m["norm_epsilon"],
        tie_word_embeddings=not m["untie_embeddings_and_output_weights"],
        rope_theta=float(m["rotary_base"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(m["rotary_base"])},
        attention_bias=False, use_sliding_window=False,
        layer_types=["full_attention"] * layers,
    )
    cfg.setdefault("initializer_range", m.get("init_method_std", 0.02))
    cfg.setdefault("torch_dtype", "float32")
    return cfg


def qwen3_moe_hf_config(m: dict, vocab_size: int, template: dict | None = None) -> dict:
    """`ModelConfig` fields -> HF Qwen3-MoE config.json (keys of `template` kept)."""
    cfg = qwen3_hf_config(m, vocab_size, template)
    if "layer_types" not in (template or {}):
        del cfg["layer_types"]  # not a Qwen3-MoE field
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
               **qwen3_moe_hf_fields(m, cfg))
    return cfg


def qwen3_check_pattern(m: dict) -> None:
    pattern = m["hybrid_layer_pattern"].replace("|", "")
    if len(pattern) % 2 or pattern[::2] != "*" * (len(pattern) // 2) \
            or set(pattern[1::2]) - set("-E") \
            or m["activation"] != "swiglu" or not m["qk_layernorm"] \
            or m["position_embedding_type"] != "rope":
        raise ConversionError("not a Qwen3-shaped model (pattern *-*-... or *E*E..., SwiGLU, "
                              "QK-norm, RoPE)")


def qwen3_to_megatron(hf_sd: dict[str, Tensor], m: dict) -> dict[str, Tensor]:
    """HF Qwen3 weights -> Megatron state dict (TP=1). Raises on missing or unused weights."""
    sd = dict(hf_sd)
    heads, groups = m["num_attention_heads"], m["num_query_groups"]
    hd = m["kv_channels"]
    out = {"embedding.word_embeddings.weight": _take(sd, "model.embed_tokens.weight"),
           "decoder.final_norm.weight": _take(sd, "model.norm.weight")}
    if m["untie_embeddings_and_output_weights"]:
        out["output_layer.weight"] = _take(sd, "lm_head.weight")
    else:
        sd.pop("lm_head.weight", None)  # a saved copy of the tied embedding
    pattern = m["hybrid_layer_pattern"].replace("|", "")
    for layer in range(len(pattern) // 2):
        h, a, f = f"model.layers.{layer}.", f"decoder.layers.{2 * layer}.", \
            f"decoder.layers.{2 * layer + 1}."
        out[a + "input_layernorm.weight"] = _take(sd, h + "input_layernorm.weight")
        out[a + "self_attention.linear_qkv.weight"] = pack_qkv(
            _take(sd, h + "self_attn.q_proj.weight"), _take(sd, h + "self_attn.k_proj.weight"),
            _take(sd, h + "self_attn.v_proj.weight"), groups, hd)
        out[a + "self_attention.q_layernorm.weight"] = _take(sd, h + "self_attn.q_norm.weight")
        out[a + "self_attention.k_layernorm.weight"] = _take(sd, h + "self_attn.k_norm.weight")
        out[a + "self_attention.linear_proj.weight"] = _take(sd, h + "self_attn.o_proj.weight")
        if pattern[2 * layer + 1] == "E":
            out.update(moe_to_megatron(sd, h, f, m, QWEN3_MOE))
            continue
        out[f + "pre_mlp_layernorm.weight"] = _take(sd, h + "post_attention_layernorm.weight")
        out[f + "mlp.linear_fc1.weight"] = torch.cat(
            [_take(sd, h + "mlp.gate_proj.weight"), _take(sd, h + "mlp.up_proj.weight")], 0)
        out[f + "mlp.linear_fc2.weight"] = _take(sd, h + "mlp.down_proj.weight")
    del heads
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if sd:
        raise ConversionError(f"unused Hugging Face weights: {sorted(sd)[:5]}")
    return out


def megatron_to_qwen3(meg: dict[str, Tensor], m: dict) -> dict[str, Tensor]:
    """Megatron state dict (TP=1) -> HF Qwen3 weights."""
    sd = dict(meg)
    heads, groups = m["num_attention_heads"], m["num_query_groups"]
    hd = m["kv_channels"] or m["hidden_size"] // heads
    out = {"model.embed_tokens.weight": _take(sd, "embedding.word_embeddings.weight"),
           "model.norm.weight": _take(sd, "decoder.final_norm.weight")}
    if m["untie_embeddings_and_output_weights"]:
        out["lm_head.weight"] = _take(sd, "output_layer.weight")
    pattern = m["hybrid_layer_pattern"].replace("|", "")
    for layer in range(len(pattern) // 2):
        h, a, f = f"model.layers.{layer}.", f"decoder.layers.{2 * layer}.", \
            f"decoder.layers.{2 * layer + 1}."
        out[h + "input_layernorm.weight"] = _take(sd, a + "input_layernorm.weight")
        q, k, v = unpack_qkv(_take(sd, a + "self_attention.linear_qkv.weight"), heads, groups, hd)
        out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
        out[h + "self_attn.v_proj.weight"] = v
        out[h + "self_attn.q_norm.weight"] = _take(sd, a + "self_attention.q_layernorm.weight")
        out[h + "self_attn.k_norm.weight"] = _take(sd, a + "self_attention.k_layernorm.weight")
        out[h + "self_attn.o_proj.weight"] = _take(sd, a + "self_attention.linear_proj.weight")
        if pattern[2 * layer + 1] == "E":
            out.update(moe_to_hf(sd, h, f, m, QWEN3_MOE))
            continue
        out[h + "post_attention_layernorm.weight"] = _take(sd, f + "pre_mlp_layernorm.weight")
        gate, up = _take(sd, f + "mlp.linear_fc1.weight").chunk(2, 0)
        out[h + "mlp.gate_proj.weight"] = gate.contiguous()
        out[h + "mlp.up_proj.weight"] = up.contiguous()
        out[h + "mlp.down_proj.weight"] = _take(sd, f + "mlp.linear_fc2.weight")
    if sd:
        raise ConversionError(f"unmapped Megatron weights: {sorted(sd)[:5]}")
    return out


# ---------------------------------------------------------------------------------------
# Nemotron-H (hybrid). Published checkpoints (nvidia/NVIDIA-Nemotron-Nano-12B-v2-Base,
# nvidia/Nemotron-H-8B-Base-8K) name weights `backbone.*` and the embedding
# `backbone.embedding.weight`; transformers >= 5 renames them `model.*` / `embeddings` in
# memory and back on save. Both spellings are read; the published one is written.

NEMOTRON_H_ATTENTION = {  # HF mixer suffix -> Megatron suffix ("*" layers, besides q/k/v)
    "mixer.o_proj.weight": "self_attention.linear_proj.weight",
    "norm.weight": "input_layernorm.weight",
}
NEMOTRON_H_MLP = {  # "-" layers: squared-ReLU MLP, not gated
    "mixer.up_proj.weight": "mlp.linear_fc1.weight",
    "mixer.down_proj.weight": "mlp.linear_fc2.weight",
    "norm.weight": "pre_mlp_layernorm.weight",
}
NEMOTRON_H_MAMBA = {  # "M" layers: Megatron 0.19 MambaLayer / MambaMixer parameter names.
    # in_proj rows are [z, x, B, C, dt] on both sides (TP=1); conv weight [conv_dim, 1, k].
    # Checked against transformers' forward with M layers (tests/e2e/test_convert.py).
    "norm.weight": "norm.weight",
    "mixer.in_proj.weight": "mixer.in_proj.weight",
    "mixer.conv1d.weight": "mixer.conv1d_weight",
    "mixer.conv1d.bias": "mixer.conv1d_bias",
    "mixer.dt_bias": "mixer.dt_bias",
    "mixer.A_log": "mixer.A_log",
    "mixer.D": "mixer.D",
    "mixer.norm.weight": "mixer.norm.weight",
    "mixer.out_proj.weight": "mixer.out_proj.weight",
}


def nemotron_h_pattern(hf: dict) -> str:
    pattern = hf.get("hybrid_override_pattern")
    if pattern is None and hf.get("layers_block_type"):
        # transformers >= 5.15 writes Mamba layers as "linear_attention"
        kinds = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                 "mlp": "-", "moe": "E"}
        pattern = "".join(kinds[k] for k in hf["layers_block_type"])
    if not pattern or set(pattern) - set("M*-E"):
        raise ConversionError(f"Nemotron-H layer pattern {pattern!r} (only M, *, -, E layers)")
    return pattern


def nemotron_h_model_config(hf: dict) -> dict:
    """HF Nemotron-H config.json -> `ModelConfig` fields (refusals.py: what is not modelled)."""
    _check(hf, "nemotron_h")
    heads = int(hf["num_attention_heads"])
    out = dict(
        name=str(hf.get("_name_or_path") or "nemotron_h") or "nemotron_h",
        hybrid_layer_pattern=nemotron_h_pattern(hf),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        qk_layernorm=False,
        activation="squared_relu",
        position_embedding_type="none",
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        max_sequence_length=int(hf.get("max_position_embeddings", 8192)),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    if "M" in out["hybrid_layer_pattern"]:
        out.update(mamba_num_heads=int(hf["mamba_num_heads"]),
                   mamba_head_dim=int(hf["mamba_head_dim"]),
                   mamba_state_dim=int(hf["ssm_state_size"]),
                   mamba_num_groups=int(hf["n_groups"]))
    if "E" in out["hybrid_layer_pattern"]:
        out.update(nemotron_h_moe_fields(hf))
    return out


def nemotron_h_hf_config(m: dict, vocab_size: int, template: dict | None = None) -> dict:
    pattern = m["hybrid_layer_pattern"].replace("|", "")
    cfg = dict(template or {})
    cfg.update(
        architectures=["NemotronHForCausalLM"], model_type="nemotron_h", vocab_size=vocab_size,
        hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=len(pattern), hybrid_override_pattern=pattern,
        num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_query_groups"],
        head_dim=m["kv_channels"] or m["hidden_size"] // m["num_attention_heads"],
        mlp_hidden_act="relu2", attention_bias=False, mlp_bias=False, use_bias=False,
        layer_norm_epsilon=m["norm_epsilon"], max_position_embeddings=m["max_sequence_length"],
        tie_word_embeddings=not m["untie_embeddings_and_output_weights"],
    )
    if "M" in pattern:
        cfg.update(mamba_num_heads=m["mamba_num_heads"], mamba_head_dim=m["mamba_head_dim"],
                   ssm_state_size=m["mamba_state_dim"], n_groups=m["mamba_num_groups"])
    if "E" in pattern:
        cfg.update(nemotron_h_moe_hf_fields(m))
    if "layers_block_type" in cfg:  # transformers >= 5.15 reads it before the pattern
        kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
        cfg["layers_block_type"] = [kinds[k] for k in pattern]
    cfg.setdefault("torch_dtype", "float32")
    return cfg


def _nemotron_prefix(hf_sd: dict[str, Tensor]) -> str:
    return "backbone." if any(k.startswith("backbone.") for k in hf_sd) else "model."


def nemotron_h_to_megatron(hf_sd: dict[str, Tensor], m: dict) -> dict[str, Tensor]:
    sd = dict(hf_sd)
    p = _nemotron_prefix(sd)
    heads, groups, hd = m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]
    del heads
    emb = p + ("embedding.weight" if p + "embedding.weight" in sd else "embeddings.weight")
    out = {"embedding.word_embeddings.weight": _take(sd, emb),
           "decoder.final_norm.weight": _take(sd, p + "norm_f.weight")}
    if m["untie_embeddings_and_output_weights"]:
        out["output_layer.weight"] = _take(sd, "lm_head.weight")
    else:
        sd.pop("lm_head.weight", None)
    for i, kind in enumerate(m["hybrid_layer_pattern"].replace("|", "")):
        h, g = f"{p}layers.{i}.", f"decoder.layers.{i}."
        if kind == "E":
            out.update(moe_to_megatron(sd, h, g, m, NEMOTRON_H_MOE))
            continue
        table = {"*": NEMOTRON_H_ATTENTION, "-": NEMOTRON_H_MLP, "M": NEMOTRON_H_MAMBA}[kind]
        for hk, mk in table.items():
            out[g + mk] = _take(sd, h + hk)
        if kind == "*":
            out[g + "self_attention.linear_qkv.weight"] = pack_qkv(
                _take(sd, h + "mixer.q_proj.weight"), _take(sd, h + "mixer.k_proj.weight"),
                _take(sd, h + "mixer.v_proj.weight"), groups, hd)
    if sd:
        raise ConversionError(f"unused Hugging Face weights: {sorted(sd)[:5]}")
    return out


def megatron_to_nemotron_h(meg: dict[str, Tensor], m: dict) -> dict[str, Tensor]:
    sd = dict(meg)
    heads, groups = m["num_attention_heads"], m["num_query_groups"]
    hd = m["kv_channels"] or m["hidden_size"] // heads
    p = "backbone."
    out = {p + "embedding.weight": _take(sd, "embedding.word_embeddings.weight"),
           p + "norm_f.weight": _take(sd, "decoder.final_norm.weight")}
    if m["untie_embeddings_and_output_weights"]:
        out["lm_head.weight"] = _take(sd, "output_layer.weight")
    else:  # transformers >= 5 never ties NemotronH's lm_head (`_tied_weights_keys = {}`)
        out["lm_head.weight"] = out[p + "embedding.weight"].clone()
    for i, kind in enumerate(m["hybrid_layer_pattern"].replace("|", "")):
        h, g = f"{p}layers.{i}.", f"decoder.layers.{i}."
        if kind == "E":
            out.update(moe_to_hf(sd, h, g, m, NEMOTRON_H_MOE))
            continue
        table = {"*": NEMOTRON_H_ATTENTION, "-": NEMOTRON_H_MLP, "M": NEMOTRON_H_MAMBA}[kind]
        for hk, mk in table.items():
            out[h + hk] = _take(sd, g + mk)
        if kind == "*":
            q, k, v = unpack_qkv(_take(sd, g + "self_attention.linear_qkv.weight"), heads,
                                 groups, hd)
            out[h + "mixer.q_proj.weight"], out[h + "mixer.k_proj.weight"] = q, k
            out[h + "mixer.v_proj.weight"] = v
    if sd:
        raise ConversionError(f"unmapped Megatron weights: {sorted(sd)[:5]}")
    return out


# ---------------------------------------------------------------------------------------

ARCHITECTURES = {
    "qwen3": dict(model_config=qwen3_model_config, hf_config=qwen3_hf_config,
                  to_megatron=qwen3_to_megatron, to_hf=megatron_to_qwen3),
    "qwen3_moe": dict(model_config=qwen3_moe_model_config, hf_config=qwen3_moe_hf_config,
                      to_megatron=qwen3_to_megatron, to_hf=megatron_to_qwen3),
    "nemotron_h": dict(model_config=nemotron_h_model_config, hf_config=nemotron_h_hf_config,
                       to_megatron=nemotron_h_to_megatron, to_hf=megatron_to_nemotron_h),
}


def architecture_of_hf(hf: dict) -> str:
    """'qwen3', 'qwen3_moe' or 'nemotron_h' from a config.json."""
    kind = hf.get("model_type") or ""
    archs = " ".join(hf.get("architectures") or [])
    if kind == "qwen3_moe" or "Qwen3MoeForCausalLM" in archs:
        return "qwen3_moe"
    if kind == "qwen3" or "Qwen3ForCausalLM" in archs:
        return "qwen3"
    if kind == "nemotron_h" or re.search(r"NemotronH", archs):
        return "nemotron_h"
    raise ConversionError(f"unsupported model_type {kind!r} / architectures {archs!r} "
                          f"(supported: Qwen3ForCausalLM, Qwen3MoeForCausalLM, "
                          "NemotronHForCausalLM)")


def architecture_of_megatron(m: dict) -> str:
    """Which HF architecture a `ModelConfig` (as a dict) exports to."""
    pattern = m["hybrid_layer_pattern"].replace("|", "")
    if m["activation"] == "swiglu":
        qwen3_check_pattern(m)
        return "qwen3_moe" if "E" in pattern else "qwen3"
    if m["activation"] == "squared_relu" and m["position_embedding_type"] == "none" \
            and not m["qk_layernorm"] and set(pattern) <= set("M*-E"):
        return "nemotron_h"
    raise ConversionError("the model is neither Qwen3-shaped (SwiGLU, QK-norm, RoPE, *-*- or "
                          "*E*E) nor Nemotron-H-shaped (squared ReLU, no QK-norm, NoPE)")
