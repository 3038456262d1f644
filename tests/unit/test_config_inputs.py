"""Config inputs a new user gets wrong (issue 25): each is either accepted and means what it
says, or refused at start-up with one line naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from megatron_rlp.config import ConfigError, load_config


def refused(overrides: tuple[str, ...], world_size: int | None = None, path=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides, world_size)
    msg = str(err.value)
    assert "\n" not in msg and "allowed" in msg, msg
    return msg


# --- item 2: a pipeline split Megatron cannot make ------------------------------------------

def test_layers_not_dividing_into_pipeline_stages_are_refused():
    msg = refused(("parallel.pipeline_model_parallel_size=2", "model.hybrid_layer_pattern=*-*-*",
                   "train.objective=ntp"), 2)
    assert "model.hybrid_layer_pattern='*-*-*'" in msg and "5 layers" in msg
    assert "pipeline_model_parallel_size=2" in msg and "'*-|*-*'" in msg  # an accepted split
    # both forms Megatron accepts: an even split without `|`, or one stage per `|` segment
    for pattern in ("*-*-", "*-|*-", "*-*|-"):
        load_config(None, ("parallel.pipeline_model_parallel_size=2",
                           f"model.hybrid_layer_pattern={pattern}", "train.objective=ntp"), 2)


# --- item 9 -----------------------------------------------------------------------------------

def test_ntp_batch_size_is_checked_only_where_it_is_used():
    load_config(None, ("data.ntp_batch_size=3",), 2)  # RLP never reads it
    msg = refused(("data.ntp_batch_size=3", "train.objective=ntp"), 2)
    assert "data.ntp_batch_size=3" in msg and "data-parallel size 2" in msg
    load_config(None, ("rlp.contexts_per_step=3", "train.objective=ntp"), 2)  # nor NTP this


@pytest.mark.parametrize("key, guess", [("rlp.gorup_size", "rlp.group_size"),
                                        ("train.save_intervall", "train.save_interval"),
                                        ("modle.hidden_size", "model.hidden_size")])
def test_an_unknown_key_says_did_you_mean(key, guess):
    msg = refused((f"{key}=3",))
    assert "did you mean " in msg and guess in msg.split("did you mean ")[1], msg
    assert len(msg) < 200, msg  # not the list of every key of the section


def test_a_yaml_list_blend_works_on_the_command_line(tmp_path):
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            (tmp_path / f"{name}{ext}").write_bytes(b"")
    a, b = tmp_path / "a", tmp_path / "b"
    want = ["0.7", str(a), "0.3", str(b)]
    for form in (f'["0.7", "{a}", "0.3", "{b}"]', f"[0.7, {a}, 0.3, {b}]", f"0.7 {a} 0.3 {b}"):
        cfg = load_config(None, (f"data.blend={form}",))
        assert cfg.data.blend == want, form
    msg = refused(('data.blend=["0.7",',))  # what an unquoted list becomes in the shell
    assert "data.blend='[\"0.7\",'" in msg and "quote" in msg, msg


# --- left open in earlier notes --------------------------------------------------------------

def test_thought_template_null_means_none_and_markers_in_it_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rlp:\n  thought_template: null\n")
    assert load_config(str(path)).rlp.thought_template == "none"
    msg = refused(("rlp.thought_template={context} so </think> then",))
    assert "rlp.thought_template=" in msg and "</think>" in msg


def test_flex_without_shared_prefixes_is_refused():
    msg = refused(("model.packed_attention=flex", "rlp.share_prefixes=false"))
    assert "model.packed_attention='flex'" in msg and "rlp.share_prefixes" in msg
    load_config(None, ("model.packed_attention=auto", "rlp.share_prefixes=false"))


# --- item 6: a big recipe run as RLP from random weights ------------------------------------

def test_a_recipe_without_its_pretrained_model_is_refused_at_start():
    from megatron_rlp.startup import check_run_start

    recipe = "examples/configs/qwen3_1p7b.yaml"
    cfg = load_config(recipe, (), 32)  # tools read the recipe's shapes without a checkpoint
    with pytest.raises(ConfigError) as err:
        check_run_start(cfg)
    msg = str(err.value)
    assert msg.startswith("invalid config: train.load=None (allowed: this recipe continues "
                          "Qwen/Qwen3-1.7B-Base") and "\n" not in msg, msg
    assert "data.tokenizer=" in msg and "data.corpus=" in msg and "allow_random_init" in msg
    with pytest.raises(ConfigError, match=r"data\.tokenizer='byte'"):
        check_run_start(load_config(recipe, ("train.load=examples",), 32))
    check_run_start(load_config(recipe, ("train.allow_random_init=true",), 32))
    check_run_start(load_config("examples/configs/tiny_cpu.yaml"))  # no base model: as before


# --- item 8: the converted checkpoint's model.yaml as a second --config ----------------------

def test_several_config_files_merge_later_ones_winning(tmp_path):
    run, model = tmp_path / "run.yaml", tmp_path / "model.yaml"
    run.write_text("model:\n  hidden_size: 96\n  rotary_base: 10000\nrlp:\n  group_size: 8\n")
    model.write_text("model:\n  rotary_base: 1000000\n  norm_epsilon: 1.0e-5\n")
    cfg = load_config([str(run), str(model)], ("rlp.group_size=6",))
    assert (cfg.model.hidden_size, cfg.model.rotary_base, cfg.model.norm_epsilon) == \
        (96, 1_000_000, 1e-5)
    assert cfg.rlp.group_size == 6  # overrides come last
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([str(run), str(tmp_path / "nope.yaml")])


# --- left open: RLP keys in an NTP run --------------------------------------------------------

def test_rlp_keys_an_ntp_run_does_not_read_are_named():
    from megatron_rlp.startup import unused_keys

    cfg = load_config(None, ("train.objective=ntp", "rlp.group_size=8", "rlp.kl_coef=0.1"))
    assert unused_keys(cfg) == ["rlp.group_size=8", "rlp.kl_coef=0.1"]
    evaluated = load_config(None, ("train.objective=ntp", "rlp.group_size=8", "rlp.kl_coef=0.1",
                                   "train.eval_interval=5", "data.split=90,10,0"))
    assert unused_keys(evaluated) == ["rlp.kl_coef=0.1"]  # validation samples G thoughts
    assert unused_keys(load_config(None, ("rlp.group_size=8",))) == []
