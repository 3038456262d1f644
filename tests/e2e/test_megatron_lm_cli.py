"""A Megatron-LM checkpoint through the command line: `pretrain_rlp.py train.load=SAVE
train.use_checkpoint_args=true` trains RLP steps from it (warm start at step 0, teacher copied
at the first step), also as a 2-process TP=2 job (the TP=1 checkpoint resharded: same first
step), and `tools/convert_checkpoint.py megatron-to-megatron-lm` writes the trained policy back
as a Megatron-LM checkpoint holding exactly its tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import megatron_lm_side as mlm
import pytest
import torch
from helpers.checkpoint_helpers import ROOT, SMALL, latest, ok, read_tensors, rows
from megatron.core import dist_checkpointing

from megatron_rlp import distributed
from megatron_rlp.config import RunConfig

SMALL_RLP = tuple(o for o in SMALL if not o.startswith("model."))


def test_rlp_from_a_megatron_lm_checkpoint_and_back(tmp_path):
    cfg = RunConfig()
    cfg.device.type = "cpu"
    cfg.device.num_threads = 1
    env = dict(os.environ)
    distributed.initialize(cfg)
    try:
        mlm.write_checkpoint(mlm.HYBRID_FLAGS, str(tmp_path / "mlm"), 320, iteration=40, seed=1)
    finally:
        distributed.shutdown()
        os.environ.clear()
        os.environ.update(env)
    source = read_tensors(tmp_path / "mlm" / "iter_0000040")

    # The dense tiny config: the model section comes from the checkpoint.
    run = ok(f"train.load={tmp_path}/mlm",
             "train.use_checkpoint_args=true", "train.steps=2", f"train.save={tmp_path}/rlp",
             f"train.metrics_file={tmp_path}/m.jsonl")
    assert "warm-started the policy from a Megatron-LM hybrid checkpoint (iteration 40)" in run.out
    assert [r["step"] for r in rows(tmp_path / "m.jsonl")] == [1, 2]
    trained = read_tensors(latest(tmp_path / "rlp"))
    # The teacher started as the warm-started policy and moved by (1 - tau) per step only.
    key = "decoder.layers.3.self_attention.linear_qkv.weight"
    assert torch.allclose(trained["ema." + key], source[key], atol=1e-3)
    assert not torch.equal(trained["model." + key], source[key])

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # The same warm start as a TP=2 job: the TP=1 Megatron-LM checkpoint resharded at load.
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "pretrain_rlp.py",
                           "--config", "examples/configs/tiny_cpu.yaml", *SMALL_RLP,
                           f"train.load={tmp_path}/mlm", "train.use_checkpoint_args=true",
                           "train.steps=1", "parallel.tensor_model_parallel_size=2",
                           f"train.metrics_file={tmp_path}/tp2.jsonl"], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = rows(tmp_path / "m.jsonl")[0], rows(tmp_path / "tp2.jsonl")[0]
    for key in ("s_ema", "s_pred", "reward_mean", "thought_len"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key

    export = [sys.executable, "tools/convert_checkpoint.py", "megatron-to-megatron-lm",
              "--checkpoint", str(tmp_path / "rlp"), "--out", str(tmp_path / "back")]
    proc = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--hybrid-layer-pattern 'M-M*-M-'" in proc.stdout  # shlex-quoted: `*` is a glob
    again = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)  # into the now non-empty --out: refused
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr[-3000:]
    again = subprocess.run([*export, "--overwrite"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)  # the same iteration written again
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "back" / "latest_checkpointed_iteration.txt").read_text() == "2"
    back = read_tensors(tmp_path / "back" / "iter_0000002")
    assert back.keys() == source.keys()  # Megatron-LM's names and layout, as it was read
    for k, v in back.items():
        assert torch.equal(v, trained["model." + k]), k
    args = dist_checkpointing.load_common_state_dict(str(tmp_path / "back" / "iter_0000002"))
    assert args["args"].hybrid_layer_pattern == "M-M*-M-" and args["iteration"] == 2
