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
)
from megatron_rlp.convert.refusals import check_hf_config, check_megatron_model

ROOT = Path(__file__).resolve().parents[2]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def configs():
    """config.json dicts as transformers 5 writes them (every default spelled out)."""
    from transformers import NemotronHConfig, Qwen3Config

    q = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    n = NemotronHConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=7, hybrid_override_pattern="M-M*-M-",
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2)
    return {"qwen3": json.loads(q.to_json_string(use_diff=False)),
            "nemotron_h": json.loads(n.to_json_string(use_diff=False))}


MAP = {"qwen3": qwen3_model_config, "nemotron_h": nemotron_h_model_config}

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
]


@pytest.mark.parametrize("arch, change, expected", REFUSED,
                         ids=[f"{a}-{'-'.join(c)}" for a, c, _ in REFUSED])
def test_unmodelled_field_is_refused_in_one_line(configs, arch, change, expected):
    hf = {**configs[arch], **change}
    with pytest.raises(ConversionError) as err:
        MAP[arch](hf)
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
])
def test_what_is_modelled_converts(configs, arch, change):
    fields = MAP[arch]({**configs[arch], **change})
    assert fields["hidden_size"] == 64
    if "rope_theta" in change:
        assert fields["rotary_base"] == 500000


def test_megatron_side_fields_hf_cannot_express():
    m = dict(normalization="LayerNorm", position_embedding_type="rope", activation="swiglu",
             qk_layernorm=True)
    with pytest.raises(ConversionError, match="model.normalization='LayerNorm'"):
        check_megatron_model(m, "qwen3")
    check_megatron_model({**m, "normalization": "RMSNorm"}, "qwen3")


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
