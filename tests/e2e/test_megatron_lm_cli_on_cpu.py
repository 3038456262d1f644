"""A Megatron-LM checkpoint through the command line: `pretrain_rlp.py train.load=SAVE
train.use_checkpoint_args=true` trains RLP steps from it (warm start at step 0, teacher copied
at the first step), and `tools/convert_checkpoint.py megatron-to-megatron-lm` writes the
trained policy back as a Megatron-LM checkpoint holding exactly its tensors."""

from __future__ import annotations

import os
import subprocess
import sys

import megatron_lm_side as mlm
import torch
from checkpoint_helpers import ROOT, latest, ok, read_tensors, rows
from megatron.core import dist_checkpointing

from megatron_rlp import distributed
from megatron_rlp.config import RunConfig


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
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py",
                           "megatron-to-megatron-lm", "--checkpoint", str(tmp_path / "rlp"),
                           "--out", str(tmp_path / "back")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--hybrid-layer-pattern M-M*-M-" in proc.stdout
    assert (tmp_path / "back" / "latest_checkpointed_iteration.txt").read_text() == "2"
    back = read_tensors(tmp_path / "back" / "iter_0000002")
    assert back.keys() == source.keys()  # Megatron-LM's names and layout, as it was read
    for k, v in back.items():
        assert torch.equal(v, trained["model." + k]), k
    args = dist_checkpointing.load_common_state_dict(str(tmp_path / "back" / "iter_0000002"))
    assert args["args"].hybrid_layer_pattern == "M-M*-M-" and args["iteration"] == 2
