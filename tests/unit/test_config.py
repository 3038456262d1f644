"""Typed config: defaults, YAML + overrides with type coercion, and one-line ConfigErrors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from megatron_rlp.config import ConfigError, RunConfig
from megatron_rlp.startup import load_config


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg == RunConfig().validate()
    assert cfg.device.type == "cpu" and cfg.precision.fp8 is None
    assert load_config(world_size=1) == cfg and load_config(world_size=8) == cfg


def test_yaml_file_then_overrides_with_coercion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n"
        "  hidden_size: 64\n"
        "  qk_layernorm: no\n"  # YAML 1.1 bool
        "  kv_channels: ~\n"
        "rlp:\n"
        "  group_size: 8\n"
        "  temperature: 1\n"  # int -> float
        "optimizer:\n"
        "  lr: 1e-4\n"  # PyYAML reads this as the string '1e-4'
        "train:\n"
        "  save: runs/x\n"
        "  steps: 1e2\n"  # a whole float -> int
        "device: cpu\n"  # shorthand for device.type
    )
    cfg = load_config(str(path), (
        "rlp.group_size=4",  # overrides win over the file
        "optimizer.min_lr=1e-5",
        "model.kv_channels=16",
        "train.save=null",
        "train.metrics_file=None",
        "model.untie_embeddings_and_output_weights=true",
        "parallel.use_distributed_optimizer=False",
        "rlp.max_thought_tokens=0x8",
        "model.hybrid_layer_pattern=*-",  # raw string: no YAML alias parsing
        "data.corpus=some dir/c.jsonl",
        "train.objective=ntp",
    ))
    m, r, o, t = cfg.model, cfg.rlp, cfg.optimizer, cfg.train
    assert m.hidden_size == 64 and type(m.hidden_size) is int
    assert m.qk_layernorm is False and m.untie_embeddings_and_output_weights is True
    assert m.kv_channels == 16 and m.hybrid_layer_pattern == "*-"
    assert r.group_size == 4 and r.max_thought_tokens == 8
    assert r.temperature == 1.0 and type(r.temperature) is float
    assert o.lr == 1e-4 and type(o.lr) is float and o.min_lr == 1e-5
    assert t.save is None and t.metrics_file is None and t.steps == 100
    assert t.objective == "ntp" and cfg.parallel.use_distributed_optimizer is False
    assert cfg.data.corpus == "some dir/c.jsonl"
    assert cfg.device.type == "cpu"


def test_device_shorthand_and_full_key(tmp_path):
    assert load_config(None, ("device=cpu",)).device.type == "cpu"
    path = tmp_path / "d.yaml"
    path.write_text("device:\n  type: cpu\n  num_threads: 3\n")
    cfg = load_config(str(path))
    assert cfg.device.type == "cpu" and cfg.device.num_threads == 3
    path.write_text("device: cuda\nprecision:\n  params_dtype: bf16\n")
    cfg = load_config(str(path))  # validation needs no GPU; bf16 is allowed on cuda
    assert cfg.device.type == "cuda" and cfg.precision.params_dtype == "bf16"
    # bf16 runs on the CPU too (the same dtype logic a GPU run uses; issue 10).
    assert load_config(None, ("precision.params_dtype=bf16",)).precision.params_dtype == "bf16"


def test_to_dict_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ("rlp.group_size=8", "precision.fp8=null", "train.seed=7"))
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(path)) == cfg


# (overrides, world_size, substrings the one-line message must contain)
BAD = [
    pytest.param(("foo.bar=1",), None, ["'foo'", "allowed: model, parallel, rlp"],
                 id="unknown-section"),
    pytest.param(("rlp.gorup_size=3",), None, ["'rlp.gorup_size'", "group_size"],
                 id="unknown-key"),
    pytest.param(("rlp.group_size=abc",), None, ["rlp.group_size='abc'", "an integer"],
                 id="wrong-type-int"),
    pytest.param(("rlp.group_size=2.5",), None, ["rlp.group_size=2.5", "an integer"],
                 id="wrong-type-fraction"),
    pytest.param(("model.qk_layernorm=maybe",), None,
                 ["model.qk_layernorm='maybe'", "true or false"], id="wrong-type-bool"),
    pytest.param(("rlp.group_size=1",), None, ["rlp.group_size=1", ">= 2"], id="group-size-1"),
    pytest.param(("rlp.temperature=0",), None, ["rlp.temperature=0", "> 0"], id="temperature-0"),
    pytest.param(("rlp.top_p=1.5",), None, ["rlp.top_p=1.5", "(0, 1]"], id="top-p-1.5"),
    pytest.param(("parallel.tensor_model_parallel_size=0",), None,
                 ["parallel.tensor_model_parallel_size=0", ">= 1"], id="tp-0"),
    pytest.param(("model.hybrid_layer_pattern=*X",), None,
                 ["model.hybrid_layer_pattern='*X'", "(attention)"], id="pattern-*X"),
    pytest.param(("model.hybrid_layer_pattern=",), None,
                 ["model.hybrid_layer_pattern=''", "non-empty"], id="pattern-empty"),
    pytest.param(("model.hybrid_layer_pattern=*G",), None,
                 ["model.hybrid_layer_pattern='*G'", "E (MoE)"], id="pattern-gdn-not-shipped"),
    pytest.param(("model.hybrid_layer_pattern=M-",), None,
                 ["model.mamba_num_groups=8", "divisor of the 6 Mamba heads"], id="mamba-groups"),
    pytest.param(("model.hybrid_layer_pattern=M-", "model.mamba_num_groups=3",
                  "parallel.tensor_model_parallel_size=2"), None,
                 ["parallel.tensor_model_parallel_size=2", "mamba_num_groups=3"],
                 id="mamba-groups-vs-tp"),
    pytest.param(("model.hybrid_layer_pattern=||",), None,
                 ["model.hybrid_layer_pattern='||'", "non-empty"], id="pattern-no-layers"),
    pytest.param(("model.hybrid_layer_pattern=*-|*-", "train.objective=ntp"), None,
                 ["model.hybrid_layer_pattern='*-|*-'", "pipeline_model_parallel_size=1"],
                 id="pattern-stages-vs-pp"),
    pytest.param(("model.kv_channels=-4",), None, ["model.kv_channels=-4", "positive"],
                 id="kv-channels"),
    pytest.param(("rlp.temperature=inf",), None, ["rlp.temperature=inf", "finite"],
                 id="temperature-inf"),
    pytest.param(("optimizer.lr=-1",), None, ["optimizer.lr=-1", "> 0"], id="lr-negative"),
    pytest.param(("train.objective=sft",), None, ["train.objective='sft'", "'rlp', 'ntp'"],
                 id="objective-sft"),
    pytest.param(("model.num_query_groups=4",), None,
                 ["model.num_query_groups=4", "num_attention_heads=6"], id="gqa-4-of-6"),
    pytest.param(("model.hidden_size=100",), None,
                 ["model.hidden_size=100", "multiple of num_attention_heads"], id="head-dim"),
    pytest.param(("precision.fp8=hybrid",), None, ["precision.fp8='hybrid'", "Transformer Engine"],
                 id="fp8-on-cpu"),
    pytest.param(("rlp.tis_cap=0",), None, ["rlp.tis_cap=0", "a finite number > 0"],
                 id="tis-cap-0"),
    pytest.param(("rlp.logp_old_source=behaviour",), None,
                 ["rlp.logp_old_source", "behaviour"], id="logp-old-source"),
    pytest.param(("parallel.sequence_parallel=true",), None,
                 ["parallel.sequence_parallel=True", "tensor_model_parallel_size > 1"],
                 id="sp-without-tp"),
    pytest.param(("parallel.pipeline_model_parallel_size=2",
                  "model.hybrid_layer_pattern=*-|*-|*-"), None,
                 ["model.hybrid_layer_pattern='*-|*-|*-'", "pipeline_model_parallel_size=2"],
                 id="pp-stages-mismatch"),
    pytest.param(("parallel.virtual_pipeline_model_parallel_size=2",), None,
                 ["parallel.virtual_pipeline_model_parallel_size=2",
                  "pipeline_model_parallel_size >= 2"], id="vp-without-pp"),
    pytest.param(("parallel.pipeline_model_parallel_size=2",
                  "parallel.virtual_pipeline_model_parallel_size=2",
                  "model.hybrid_layer_pattern=*-|*-"), None,
                 ["model.hybrid_layer_pattern='*-|*-'", "4 | separated chunks"],
                 id="vp-chunks-mismatch"),
    pytest.param(("parallel.pipeline_model_parallel_size=2",
                  "parallel.virtual_pipeline_model_parallel_size=2",
                  "model.hybrid_layer_pattern=*-|*-|*-|*-"), 2,
                 ["train.micro_batch_size=0", "multiple of pipeline_model_parallel_size=2"],
                 id="vp-microbatches"),
    pytest.param(("model.max_sequence_length=64",), None,
                 ["model.max_sequence_length=64", ">= 210"], id="seq-too-short"),
    pytest.param((), 3, ["rlp.contexts_per_step=8", "data-parallel size 3"], id="dp-3"),
    pytest.param(("rlp.positions_per_document=4", "rlp.contexts_per_step=8"), 4,
                 ["rlp.positions_per_document=4", "2 contexts per data-parallel rank",
                  "stay on one rank"], id="document-split-over-ranks"),
    pytest.param(("parallel.tensor_model_parallel_size=2",), 3,
                 ["parallel.tensor_model_parallel_size=2", "world size 3"], id="tp-2-world-3"),
    pytest.param(("parallel.pipeline_model_parallel_size=3", "model.hybrid_layer_pattern=*-*-*-"),
                 4, ["parallel.pipeline_model_parallel_size=3", "world size 4"],
                 id="pp-3-world-4"),
    pytest.param(("rlp.group_size4",), None, ["'rlp.group_size4'", "section.key=value"],
                 id="override-without-equals"),
    pytest.param(("rlp=4",), None, ["'rlp'", "section.key"], id="override-without-key"),
]


@pytest.mark.parametrize("overrides, world_size, expected", BAD)
def test_bad_values_raise_one_line(overrides, world_size, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, world_size)
    msg = str(err.value)
    assert "\n" not in msg and "allowed" in msg
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("text, expected", [
    ("- rlp\n- model\n", ["must map section names"]),
    ("rlp: [\n", ["not valid YAML"]),
    ("rlp:\n  group_size: 1\n", ["rlp.group_size=1"]),
    ("rlp:\n  temperature: hot\n", ["rlp.temperature='hot'", "a number"]),
    ("model:\n  hidden_size: {a: 1}\n", ["model.hidden_size=", "an integer"]),
    ("optimizer:\n  betas: [0.9, 0.95]\n", ["'optimizer.betas'", "adam_beta1"]),
    ("train:\n  objective: [rlp]\n", ["train.objective=['rlp']", "'rlp', 'ntp'"]),
])
def test_bad_yaml_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_config_directory_and_binary_file_are_one_line(tmp_path):
    """`--config runs/` or a binary file: one line saying what the path is, no traceback."""
    with pytest.raises(ConfigError, match="is a directory") as err:
        load_config(str(tmp_path))
    assert "does not exist" not in str(err.value) and "\n" not in str(err.value)
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\xff\xfe\x00\xc0garbage")
    with pytest.raises(ConfigError, match="not a UTF-8 text file") as err:
        load_config(str(binary))
    assert str(binary) in str(err.value) and "\n" not in str(err.value)


def test_empty_yaml_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(str(path)) == RunConfig()


def test_override_values_are_raw_strings():
    """`*-*-` would be a YAML alias and `a: b` a mapping: overrides are not YAML."""
    cfg = load_config(None, ("model.hybrid_layer_pattern=*-*-", "data.corpus=a: b #c",
                             "train.metrics_file= m.jsonl "))
    assert cfg.model.hybrid_layer_pattern == "*-*-"
    assert cfg.data.corpus == "a: b #c" and cfg.train.metrics_file == "m.jsonl"


def test_sections_are_independent_instances():
    a, b = RunConfig(), RunConfig()
    a.rlp.group_size = 16
    assert b.rlp.group_size == 4
    assert all(dataclasses.is_dataclass(getattr(a, f.name)) for f in dataclasses.fields(a))


def test_cascade_decode_auto_is_on_for_cuda_only():
    from megatron_rlp.config import RunConfig, cascade_decode
    from megatron_rlp.config.loading import _apply

    for device, given, expected in (("cpu", None, False), ("cuda", None, True),
                                    ("cpu", "true", True), ("cuda", "false", False)):
        cfg = RunConfig()
        _apply(cfg, "device.type", device)
        if given is not None:
            _apply(cfg, "rlp.cascade_decode", given)
        assert cascade_decode(cfg) is expected, (device, given)
