"""Megatron-LM checkpoints in and out (interop/megatron_lm*.py), on CPU, one gloo process.

In: a checkpoint written by Megatron-LM's own `save_checkpoint` (a GPTModel for the dense
case, a HybridModel `M-M*-M-` for the hybrid one; tests/e2e/megatron_lm_side.py) is the
`train.load` of an RLP state built from the config; with `train.use_checkpoint_args` the model
section comes from the saved args. The policy's logits equal the source model's; the teacher
is left for lazy initialisation and the step is 0.

Out: the policy exported for Megatron-LM (`export_model`, GPT and hybrid layouts) is read by
Megatron-LM's own `--use-checkpoint-args` + `load_checkpoint` into a fresh Megatron model whose
logits equal the policy's.

MoE: a GPT MoE checkpoint (Qwen3-MoE shape) and a hybrid Mamba-MoE one (Nemotron 3 shape:
sigmoid router, expert bias, shared expert) load with the source's logits, experts included;
an MoE policy exported and read back by Megatron-LM gives its logits, and read back here its
exact weights (`expert_bias` too); under EP=2 (slow) each rank reads its share of the experts.

Also: the local spec stores TE names, and a checkpoint saved with the old local names loads.
"""

from __future__ import annotations

import os
import re
from argparse import Namespace
from pathlib import Path

import megatron_lm_side as mlm
import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedBase

from megatron_rlp import distributed
from megatron_rlp.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_rlp.config import RunConfig
from megatron_rlp.interop import megatron_lm, names
from megatron_rlp.interop.megatron_lm_export import export_model
from megatron_rlp.startup import load_config
from megatron_rlp.train.builder import build_state

ROOT = Path(__file__).resolve().parents[2]
PADDED = 320  # byte tokenizer (261 ids) padded to a multiple of 64
IDS = torch.randint(0, 261, (2, 40), generator=torch.Generator().manual_seed(0))
ATOL = 0.0  # measured: bitwise identical (same local modules, same op order)


@pytest.fixture(scope="module")
def megatron():
    """Megatron's process groups, one gloo process, CPU backend (restored env afterwards)."""
    env = dict(os.environ)
    cfg = RunConfig()
    cfg.device.type = "cpu"
    cfg.device.num_threads = 1
    distributed.initialize(cfg)
    yield
    distributed.shutdown()
    os.environ.clear()
    os.environ.update(env)


def rlp_state(config: str, *overrides: str):
    old = Path.cwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(config, ("device.num_threads=1", "rlp.contexts_per_step=4",
                                   "rlp.group_size=2", *overrides))
        return build_state(cfg)
    finally:
        os.chdir(old)


CASES = {
    "dense": ("examples/configs/tiny_cpu.yaml", mlm.DENSE_FLAGS),
    "hybrid": ("examples/configs/tiny_hybrid_cpu.yaml", mlm.HYBRID_FLAGS),
    "moe": ("examples/configs/tiny_moe_cpu.yaml", mlm.MOE_FLAGS),
    "hybrid_moe": ("examples/configs/tiny_hybrid_moe_cpu.yaml", mlm.HYBRID_MOE_FLAGS),
}
# Keys of each case's checkpoint on disk (GPT layout: layers stacked, no layer index).
ON_DISK = {
    "dense": ["decoder.layers.self_attention.linear_qkv.layer_norm_weight",
              "decoder.final_layernorm.weight"],
    "hybrid": ["decoder.layers.0.mixer.in_proj.layer_norm_weight"],
    "moe": ["decoder.layers.mlp.experts.experts.linear_fc1.weight",
            "decoder.layers.mlp.router.weight", "decoder.layers.pre_mlp_layernorm.weight"],
    "hybrid_moe": ["decoder.layers.1.mlp.experts.experts.linear_fc2.weight",
                   "decoder.layers.1.mlp.router.expert_bias",
                   "decoder.layers.4.mlp.shared_experts.linear_fc1.weight"],
}


@pytest.mark.parametrize("kind", CASES)
def test_megatron_lm_checkpoint_warm_starts_rlp_with_identical_logits(megatron, tmp_path, kind):
    config, flags = CASES[kind]
    source = mlm.write_checkpoint(flags, str(tmp_path / "mlm"), PADDED, iteration=7, seed=3)
    assert (tmp_path / "mlm" / "latest_checkpointed_iteration.txt").read_text() == "7"
    expected = mlm.logits(source, IDS)

    for load in (tmp_path / "mlm", tmp_path / "mlm" / "iter_0000007"):  # save dir or iter dir
        state = rlp_state(config, f"train.load={load}", "train.use_checkpoint_args=true")
        assert resolve_checkpoint(str(load)) == tmp_path / "mlm" / "iter_0000007"
        how = load_checkpoint(state, str(load))
        assert "Megatron-LM" in how and state.step == 0
        assert not state.teacher.initialized  # copied from the policy at the first step
        got = mlm.logits(state.policy.eval(), IDS)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    keys = dist_checkpointing.load_tensors_metadata(str(load)).keys()
    assert set(ON_DISK[kind]) <= set(keys), sorted(keys)
    if kind == "hybrid_moe":  # the selection bias came along (it changes the routing)
        source_bias = dict(source.named_buffers())["decoder.layers.1.mlp.router.expert_bias"]
        assert torch.equal(dict(state.policy.named_buffers())[
            "decoder.layers.1.mlp.router.expert_bias"], source_bias)
        assert source_bias.abs().max() > 0


def test_mismatched_model_is_one_line_naming_each_key(megatron, tmp_path):
    mlm.write_checkpoint(mlm.DENSE_FLAGS, str(tmp_path / "mlm"), PADDED, iteration=1, seed=0)
    state = rlp_state("examples/configs/tiny_cpu.yaml", "model.hybrid_layer_pattern=*-*-",
                      "model.hidden_size=64", "model.ffn_hidden_size=96",
                      "model.num_attention_heads=4", "model.rotary_base=10000")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(state, str(tmp_path / "mlm"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.ffn_hidden_size=128 (config: 96)" in msg
    assert "model.rotary_base=1000000 (config: 10000)" in msg
    assert "model.untie_embeddings_and_output_weights=True (config: False)" in msg
    assert "model.norm_epsilon" not in msg and "model.hidden_size" not in msg


@pytest.mark.parametrize("layout", ["gpt", "hybrid"])
def test_exported_policy_reloads_in_megatron_lm_with_identical_logits(megatron, tmp_path,
                                                                      layout):
    state = rlp_state("examples/configs/tiny_cpu.yaml", "model.hybrid_layer_pattern=*-*-",
                      "model.hidden_size=64", "model.ffn_hidden_size=128",
                      "model.num_attention_heads=4",
                      "model.untie_embeddings_and_output_weights=true")
    policy = state.policy.eval()
    with torch.no_grad():  # not the seeded init alone: every tensor differs from a fresh build
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path / "export"
    _, flags = export_model(policy, state.cfg.model, out, iteration=12, layout=layout)
    assert "--qk-layernorm" in flags and flags[flags.index("--norm-epsilon") + 1] == "1e-06"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "12"
    # Megatron-LM's --use-checkpoint-args copies neither of these: the user passes them.
    model, _, ckpt_args = mlm.load_with_megatron_lm(str(out), ["--qk-layernorm",
                                                               "--norm-epsilon", "1e-6"])
    assert type(model).__name__ == ("GPTModel" if layout == "gpt" else "HybridModel")
    assert ckpt_args.padded_vocab_size == PADDED
    torch.testing.assert_close(mlm.logits(model, IDS), mlm.logits(policy, IDS), atol=ATOL, rtol=0)


def test_moe_checkpoint_refusals_name_the_arg(megatron, tmp_path):
    """A configured MoE that differs from the checkpoint's names each routing key; MoE
    variants this project does not build are refused by their Megatron-LM arg."""
    mlm.write_checkpoint(mlm.MOE_FLAGS, str(tmp_path / "mlm"), PADDED, iteration=1, seed=0)
    state = rlp_state("examples/configs/tiny_moe_cpu.yaml", "model.hybrid_layer_pattern=*E*E",
                      "model.hidden_size=64", "model.ffn_hidden_size=128",
                      "model.num_attention_heads=4", "model.num_experts=4",
                      "model.moe_ffn_hidden_size=32", "model.moe_router_pre_softmax=true",
                      "model.untie_embeddings_and_output_weights=true")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(state, str(tmp_path / "mlm"))
    msg = str(e.value)
    assert "\n" not in msg and "model.num_experts=8 (config: 4)" in msg
    assert "model.moe_router_pre_softmax=False (config: True)" in msg
    assert "moe_ffn_hidden_size" not in msg

    args = megatron_lm.read_common(tmp_path / "mlm" / "iter_0000001")["args"]
    for arg, value in (("moe_router_num_groups", 2), ("moe_latent_size", 16),
                       ("moe_shared_expert_gate", True), ("moe_layer_freq", [1, 0])):
        with pytest.raises(megatron_lm.MegatronLMError, match=re.escape(f"{arg}={value!r}")):
            megatron_lm.architecture(Namespace(**{**vars(args), arg: value}))


MOE_EXPORTS = [("examples/configs/tiny_moe_cpu.yaml", "gpt", []),
               ("examples/configs/tiny_moe_cpu.yaml", "hybrid", []),
               ("examples/configs/tiny_hybrid_moe_cpu.yaml", "hybrid",
                ["model.mamba_num_heads=8", "model.mamba_head_dim=16", "model.mamba_state_dim=16",
                 "model.norm_epsilon=1e-5"])]


@pytest.mark.parametrize("config, layout, extra", MOE_EXPORTS,
                         ids=[f"{Path(c).stem}-{lay}" for c, lay, _ in MOE_EXPORTS])
def test_exported_moe_policy_round_trips_through_megatron_lm(megatron, tmp_path, config, layout,
                                                             extra):
    state = rlp_state(config, "model.hidden_size=64", "model.ffn_hidden_size=128",
                      "model.moe_ffn_hidden_size=32", *extra)
    policy = state.policy.eval()
    with torch.no_grad():  # every tensor off its seeded init, the selection bias off zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in policy.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    out = tmp_path / "export"
    _, flags = export_model(policy, state.cfg.model, out, iteration=5, layout=layout)
    assert flags[flags.index("--num-experts") + 1] == "8"
    keys = dist_checkpointing.load_tensors_metadata(str(out / "iter_0000005")).keys()
    expert = "decoder.layers.{}mlp.experts.experts.linear_fc1.weight"
    assert expert.format("" if layout == "gpt" else "1.") in keys
    # Megatron-LM's --use-checkpoint-args does not copy these (nor the router dtype).
    mine = ["--norm-epsilon", str(state.cfg.model.norm_epsilon)]
    mine += ["--qk-layernorm"] if state.cfg.model.qk_layernorm else []
    mine += ["--moe-router-dtype", "fp32"]
    model, _, _ = mlm.load_with_megatron_lm(str(out), mine)
    torch.testing.assert_close(mlm.logits(model, IDS), mlm.logits(policy, IDS), atol=ATOL, rtol=0)

    back = rlp_state(config, f"train.load={out}", "train.use_checkpoint_args=true", *extra)
    load_checkpoint(back, str(out))
    want = {k: v for k, v in policy.state_dict().items() if isinstance(v, torch.Tensor)}
    got = back.policy.state_dict()
    assert any("expert_bias" in k for k in want) == ("hybrid_moe" in config)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_local_spec_writes_te_names_and_old_local_names_still_load(megatron, tmp_path):
    state = rlp_state("examples/configs/tiny_hybrid_cpu.yaml", "model.hidden_size=64",
                      "model.ffn_hidden_size=128", "model.mamba_num_heads=8",
                      "model.mamba_head_dim=16", "model.mamba_state_dim=16")
    keys = {v.key for v in state.policy.sharded_state_dict().values()
            if isinstance(v, ShardedBase)}
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in keys  # M
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys  # -
    assert "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight" in keys  # *
    assert not names.has_local_names(keys)

    # A checkpoint of the format before the key map: the same save with local names.
    original = dist_checkpointing.save

    def save_local_names(sd, *args, **kwargs):
        names.to_local_names(sd)
        return original(sd, *args, **kwargs)

    dist_checkpointing.save = save_local_names
    try:
        ckpt = save_checkpoint(state, str(tmp_path / "old"), checksums=False)
    finally:
        dist_checkpointing.save = original
    on_disk = dist_checkpointing.load_tensors_metadata(str(ckpt)).keys()
    assert "model.decoder.layers.0.norm.weight" in on_disk and names.has_local_names(on_disk)

    fresh = rlp_state("examples/configs/tiny_hybrid_cpu.yaml", "model.hidden_size=64",
                      "model.ffn_hidden_size=128", "model.mamba_num_heads=8",
                      "model.mamba_head_dim=16", "model.mamba_state_dim=16", "train.seed=99")
    load_checkpoint(fresh, str(tmp_path / "old"), checksums=False)
    for (k, a), (_, b) in zip(state.policy.state_dict().items(),
                              fresh.policy.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


@pytest.mark.slow  # two torchrun processes: about a minute, more on a loaded machine
def test_megatron_lm_moe_checkpoint_loads_under_expert_parallelism(megatron, tmp_path):
    """EP=2: each rank reads its half of every layer's experts from a Megatron-LM checkpoint
    (one expert axis on disk). One NTP step at lr 1e-12 (and a bias step of 1e-12) later, the
    run's checkpoint holds the source's tensors, every expert and the expert bias included."""
    import subprocess
    import sys

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    mlm.write_checkpoint(mlm.HYBRID_MOE_FLAGS, str(tmp_path / "mlm"), PADDED, iteration=3,
                         seed=1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "pretrain_rlp.py", "--config",
         "examples/configs/tiny_hybrid_moe_cpu.yaml", f"train.load={tmp_path / 'mlm'}",
         "train.use_checkpoint_args=true", "parallel.expert_model_parallel_size=2",
         "train.objective=ntp", "train.steps=1", "optimizer.lr=1e-12",
         "model.moe_router_bias_update_rate=1e-12", "data.ntp_seq_length=32",
         "data.ntp_batch_size=4", f"train.save={tmp_path / 'run'}", "device.num_threads=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Megatron-LM" in proc.stdout + proc.stderr

    def tensors(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
        dcp_to_torch_save(ckpt, out)
        return {k: v for k, v in torch.load(out, weights_only=False).items()
                if isinstance(v, torch.Tensor) and "_extra_state" not in k}

    source = tensors(tmp_path / "mlm" / "iter_0000003", tmp_path / "mlm.pt")
    latest = (tmp_path / "run" / "latest").read_text().strip()
    ours = tensors(tmp_path / "run" / latest, tmp_path / "run.pt")
    assert {"decoder.layers.1.mlp.experts.experts.linear_fc1.weight",
            "decoder.layers.4.mlp.router.expert_bias"} <= set(source)
    for key, value in source.items():
        torch.testing.assert_close(ours["model." + key], value, atol=1e-8, rtol=0, msg=key)
