"""The HF converter accepts only what it models: every forward-changing config field not
mapped is refused with one line naming the field and value, in both directions
(megatron_rlp/convert/refusals.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rlp.convert.mapping import (
    ConversionError,
    nemotron_h_model_config,
    qwen3_model_config,
    qwen3_moe_model_config,
)
from megatron_rlp.convert.refusals import check_hf_config, check_megatron_model

ROOT = Path(__file__).resolve().parents[2]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def configs():
    """config.json dicts as transformers 5 writes them (every default spelled out)."""
    from transformers import NemotronHConfig, Qwen3Config, Qwen3MoeConfig

    q = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    n = NemotronHConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=7, hybrid_override_pattern="M-M*-M-",
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2)
    qm = Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=32, norm_topk_prob=True)
    nm = NemotronHConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         hybrid_override_pattern="MEM*E", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, mamba_num_heads=8,
                         mamba_head_dim=16, ssm_state_size=16, n_groups=2, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=32,
                         moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5)
    return {name: json.loads(c.to_json_string(use_diff=False)) for name, c in
            (("qwen3", q), ("nemotron_h", n), ("qwen3_moe", qm), ("nemotron_h_moe", nm))}


MAP = {"qwen3": qwen3_model_config, "nemotron_h": nemotron_h_model_config,
       "qwen3_moe": qwen3_moe_model_config, "nemotron_h_moe": nemotron_h_model_config}

# (architecture, fields changed in config.json, substrings of the one-line refusal)
REFUSED = [
    # the issue's case: rope_parameters says default, rope_scaling (model card snippet) YaRN
    ("qwen3", {"rope_scaling": YARN}, ["rope_scaling.rope_type='yarn'"]),
    ("qwen3", {"rope_parameters": {**YARN, "rope_theta": 1e6}},
     ["rope_parameters.rope_type='yarn'"]),
    ("qwen3", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     ["rope_scaling.rope_type='linear'"]),
    ("qwen3", {"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0,
                                                      "rope_theta": 1e6}}},
     ["rope_parameters['full_attention'].rope_type='dynamic'"]),
    ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                   "partial_rotary_factor": 0.5}},
     ["rope_parameters.partial_rotary_factor=0.5"]),
    ("qwen3", {"partial_rotary_factor": 0.25}, ["partial_rotary_factor=0.25"]),
    ("qwen3", {"rope_scaling": "yarn"}, ["rope_scaling='yarn'"]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 64}, ["use_sliding_window=True"]),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]},
     ["layer_types=['sliding_attention', 'full_attention']"]),
    ("qwen3", {"attention_bias": True}, ["attention_bias=True"]),
    ("qwen3", {"mlp_bias": True}, ["mlp_bias=True"]),
    ("qwen3", {"hidden_act": "gelu"}, ["hidden_act='gelu'"]),
    ("qwen3", {"attention_dropout": 0.1}, ["attention_dropout=0.1"]),
    ("qwen3", {"num_experts": 8, "num_experts_per_tok": 2}, ["num_experts=8", "dense model"]),
    ("qwen3", {"moe_intermediate_size": 768}, ["moe_intermediate_size=768"]),
    ("qwen3", {"final_logit_softcapping": 30.0}, ["final_logit_softcapping=30.0"]),
    ("nemotron_h", {"conv_kernel": 3}, ["conv_kernel=3"]),
    ("nemotron_h", {"use_conv_bias": False}, ["use_conv_bias=False"]),
    ("nemotron_h", {"mamba_proj_bias": True}, ["mamba_proj_bias=True"]),
    ("nemotron_h", {"mamba_hidden_act": "gelu"}, ["mamba_hidden_act='gelu'"]),
    ("nemotron_h", {"time_step_limit": [0.0, 0.1]}, ["time_step_limit=[0.0, 0.1]"]),
    ("nemotron_h", {"use_bias": True}, ["use_bias=True"]),
    ("nemotron_h", {"attention_bias": True}, ["attention_bias=True"]),
    ("nemotron_h", {"mlp_bias": True}, ["mlp_bias=True"]),
    ("nemotron_h", {"mlp_hidden_act": "silu"}, ["mlp_hidden_act='silu'"]),
    ("nemotron_h", {"sliding_window": 128}, ["sliding_window=128"]),
    ("nemotron_h", {"num_nextn_predict_layers": 1}, ["num_nextn_predict_layers=1"]),
    ("nemotron_h", {"position_embedding_type": "rope"}, ["position_embedding_type='rope'"]),
    ("nemotron_h", {"layer_norm_epsilon": 1e-6}, ["layer_norm_epsilon=1e-06 with Mamba"]),
    # MoE (convert/moe_mapping.py): what Megatron's router and experts cannot express
    ("qwen3_moe", {"shared_expert_intermediate_size": 512},
     ["shared_expert_intermediate_size=512"]),
    ("qwen3_moe", {"num_experts_per_tok": 9}, ["num_experts_per_tok=9", "[1, 8]"]),
    ("qwen3_moe", {"hidden_act": "gelu"}, ["hidden_act='gelu'"]),
    ("qwen3_moe", {"rope_scaling": YARN}, ["rope_scaling.rope_type='yarn'"]),
    ("nemotron_h_moe", {"moe_latent_size": 16}, ["moe_latent_size=16"]),
    ("nemotron_h_moe", {"n_group": 4, "topk_group": 2},
     ["n_group=4 with topk_group=2", "group-limited"]),
    ("nemotron_h_moe", {"n_shared_experts": 2}, ["n_shared_experts=2"]),
    ("nemotron_h_moe", {"moe_shared_expert_intermediate_size": 0},
     ["moe_shared_expert_intermediate_size=0"]),
    ("nemotron_h_moe", {"norm_topk_prob": False}, ["norm_topk_prob=False", "top-k > 1"]),
    ("nemotron_h_moe", {"num_experts_per_tok": 1}, ["norm_topk_prob=True",
                                                    "num_experts_per_tok=1"]),
    ("nemotron_h_moe", {"num_experts_per_tok": 12}, ["num_experts_per_tok=12"]),
    ("nemotron_h_moe", {"layer_norm_epsilon": 1e-6}, ["layer_norm_epsilon=1e-06"]),
]


@pytest.mark.parametrize("name, change, expected", REFUSED,
                         ids=[f"{a}-{'-'.join(c)}" for a, c, _ in REFUSED])
def test_unmodelled_field_is_refused_in_one_line(configs, name, change, expected):
    arch = name.removesuffix("_moe") if name == "nemotron_h_moe" else name
    hf = {**configs[name], **change}
    with pytest.raises(ConversionError) as err:
        MAP[name](hf)
    msg = str(err.value)
    assert "\n" not in msg and arch in msg
    for part in expected:
        assert part in msg, (part, msg)
    # and the same for what megatron-to-hf would write (e.g. from a template)
    with pytest.raises(ConversionError, match="megatron-to-hf"):
        check_hf_config(hf, arch, "megatron-to-hf")


@pytest.mark.parametrize("arch, change", [
    ("qwen3", {}),
    ("qwen3", {"rope_scaling": None, "rope_theta": 5e5, "rope_parameters": None}),
    ("qwen3", {"rope_scaling": {"rope_type": "default"}}),
    ("qwen3", {"sliding_window": 4096, "max_window_layers": 28}),  # unused: window off
    ("qwen3", {"eos_token_id": 7, "use_cache": False, "dtype": "bfloat16"}),  # no forward change
    ("nemotron_h", {}),  # transformers' MoE defaults on a dense pattern are not MoE
    ("nemotron_h", {"time_step_limit": [0.0, float("inf")], "chunk_size": 256}),
    ("qwen3_moe", {}),
    ("qwen3_moe", {"norm_topk_prob": False}),  # Megatron's pre-softmax router
    ("qwen3_moe", {"decoder_sparse_step": 2}),  # dense layer 0, MoE layer 1
    ("qwen3_moe", {"mlp_only_layers": [0]}),
    ("nemotron_h_moe", {}),
    ("nemotron_h_moe", {"n_group": 4, "topk_group": 4}),  # every group kept: no limit
    ("nemotron_h_moe", {"num_experts_per_tok": 1, "norm_topk_prob": False}),
])
def test_what_is_modelled_converts(configs, arch, change):
    fields = MAP[arch]({**configs[arch], **change})
    assert fields["hidden_size"] == 64
    if "rope_theta" in change:
        assert fields["rotary_base"] == 500000
    if arch == "qwen3_moe":
        dense = change.get("decoder_sparse_step") == 2 or change.get("mlp_only_layers")
        assert fields["hybrid_layer_pattern"] == ("*-*E" if dense else "*E*E")
        assert fields["moe_router_pre_softmax"] is (change.get("norm_topk_prob") is False)
        assert (fields["num_experts"], fields["moe_ffn_hidden_size"]) == (8, 32)
    if arch == "nemotron_h_moe":
        assert fields["hybrid_layer_pattern"] == "MEM*E"
        assert (fields["moe_router_score_function"], fields["moe_router_enable_expert_bias"],
                fields["moe_router_topk_scaling_factor"], fields["moe_router_dtype"]) == \
            ("sigmoid", True, 2.5, "fp32")


def test_megatron_side_fields_hf_cannot_express():
    m = dict(normalization="LayerNorm", position_embedding_type="rope", activation="swiglu",
             qk_layernorm=True)
    with pytest.raises(ConversionError, match="model.normalization='LayerNorm'"):
        check_megatron_model(m, "qwen3")
    check_megatron_model({**m, "normalization": "RMSNorm"}, "qwen3")


MOE = dict(normalization="RMSNorm", num_experts=8, moe_router_topk=2,
           moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
           moe_router_topk_scaling_factor=None, moe_shared_expert_intermediate_size=None,
           moe_expert_capacity_factor=None)
QWEN3_MOE = dict(MOE, hybrid_layer_pattern="*E*E", position_embedding_type="rope",
                 activation="swiglu", qk_layernorm=True)
NEMOTRON_H_MOE = dict(MOE, hybrid_layer_pattern="MEM*E", position_embedding_type="none",
                      activation="squared_relu", qk_layernorm=False, norm_epsilon=1e-5,
                      moe_router_score_function="sigmoid",
                      moe_shared_expert_intermediate_size=48)


@pytest.mark.parametrize("arch, m, expected", [
    ("qwen3_moe", {"moe_router_score_function": "sigmoid"},
     "model.moe_router_score_function='sigmoid'"),
    ("qwen3_moe", {"moe_router_enable_expert_bias": True}, "model.moe_router_enable_expert_bias"),
    ("qwen3_moe", {"moe_shared_expert_intermediate_size": 64},
     "model.moe_shared_expert_intermediate_size=64"),
    ("qwen3_moe", {"moe_router_topk_scaling_factor": 2.5},
     "model.moe_router_topk_scaling_factor=2.5"),
    ("qwen3_moe", {"moe_expert_capacity_factor": 1.5}, "model.moe_expert_capacity_factor=1.5"),
    ("nemotron_h", {"moe_router_score_function": "softmax"},
     "model.moe_router_score_function='softmax'"),
    ("nemotron_h", {"moe_shared_expert_intermediate_size": None},
     "model.moe_shared_expert_intermediate_size=None"),
    ("nemotron_h", {"norm_epsilon": 1e-6}, "model.norm_epsilon=1e-06 with M layers"),
])
def test_megatron_moe_settings_the_hf_family_cannot_express(arch, m, expected):
    base = QWEN3_MOE if arch == "qwen3_moe" else NEMOTRON_H_MOE
    check_megatron_model(base, arch)  # the family's own settings export
    with pytest.raises(ConversionError) as err:
        check_megatron_model({**base, **m}, arch)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_the_issue_config_before_reading_weights(configs, tmp_path):
    """Qwen3 config.json as transformers 5 writes it plus the model card's YaRN snippet:
    exit 2, one `error:` line naming the field, no weights read, nothing written."""
    hf = {**configs["qwen3"], "architectures": ["Qwen3ForCausalLM"], "rope_scaling": YARN}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"),
                           "hf-to-megatron", "--hf-dir", str(tmp_path / "hf"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "rope_scaling.rope_type='yarn'" in lines[0]
    assert not (tmp_path / "out").exists()
