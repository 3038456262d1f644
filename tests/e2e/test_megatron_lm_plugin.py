"""RLP through Megatron-LM's own `megatron.training.pretrain()` (megatron_rlp/plugin.py, run by
examples/megatron_lm/pretrain_gpt_rlp.py on the CPU backend, one gloo process):

- it trains RLP steps whose per-step metrics equal `pretrain_rlp.py`'s on the same model,
  data, RLP settings and seed;
- Megatron's checkpoint holds the EMA teacher, equal to the one `pretrain_rlp.py` saves at
  the same step (so the teacher was updated after every optimizer step);
- resuming with Megatron-LM's `--load` restores the teacher: the resumed step's `S_ema` is the
  uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.checkpoint_helpers import ROOT, latest, ok, read_tensors, rows

MEGATRON_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--qk-layernorm", "--swiglu", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6",
    "--position-embedding-type", "rope", "--rotary-base", "1000000", "--disable-bias-linear",
    "--seq-length", "256", "--max-position-embeddings", "256",
    "--make-vocab-size-divisible-by", "64", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "261", "--micro-batch-size", "4", "--global-batch-size", "16",
    "--lr", "1e-2", "--min-lr", "0", "--lr-decay-style", "constant", "--weight-decay", "0.1",
    "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--adam-eps", "1e-8", "--clip-grad", "1.0",
    "--init-method-std", "0.02", "--seed", "1234", "--log-interval", "1", "--eval-iters", "0",
    "--eval-interval", "1000", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--ckpt-format", "torch_dist",
    # the CPU backend (megatron_rlp/backends/training_cpu.py)
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-rope-fusion",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
    "--no-persist-layer-norm", "--use-cpu-initialization", "--num-workers", "0",
    "--rlp-device", "cpu", "--rlp-num-threads", "1", "--rlp-group-size", "4",
    "--rlp-max-thought-tokens", "6", "--rlp-no-share-prefixes",
    "--rlp-prefix-tokens", "8", "64",
]
# The same run for pretrain_rlp.py (tests/helpers/checkpoint_helpers.py SMALL + these). Both runs
# take the per-context path (rlp.share_prefixes=false / --rlp-no-share-prefixes) here;
# test_plugin_packed_update_matches_pretrain_rlp compares the shared-prefix, packed one.
OWN = ("rlp.share_prefixes=false", "model.ffn_hidden_size=128", "model.max_sequence_length=256",
       "optimizer.min_lr=0", "optimizer.weight_decay=0.1", "optimizer.clip_grad=1.0",
       "train.micro_batch_size=4", "rlp.group_size=4")
COMPARED = ("reward_mean", "reward_std", "advantage_std", "thought_len", "closed_fraction",
            "s_ema", "s_pred", "loss", "clip_fraction")
TEACHER = "ema.decoder.layers.0.self_attention.linear_qkv.weight"


def plugin_run(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "examples/megatron_lm/pretrain_gpt_rlp.py",
                           *MEGATRON_FLAGS, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """pretrain_rlp.py: 3 steps, checkpoint of step 2 kept."""
    d = tmp_path_factory.mktemp("own")
    ok(*OWN, "train.steps=3", f"train.save={d}/ckpt", "train.save_interval=2",
       f"train.metrics_file={d}/m.jsonl", "train.checkpoint_checksums=false")
    return d


def test_plugin_trains_rlp_through_megatron_pretrain_like_pretrain_rlp(own_run, tmp_path):
    proc = plugin_run("--train-iters", "3", "--save", str(tmp_path / "mlm"),
                      "--save-interval", "2", "--rlp-metrics-file", str(tmp_path / "p.jsonl"))
    assert "iteration        3/       3" in proc.stdout  # Megatron-LM's own log line
    ref = rows(own_run / "m.jsonl")
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3]
    assert not any(r["packed_update"] for r in got)  # --rlp-no-share-prefixes: per sequence
    for a, b in zip(ref, got, strict=True):
        for key in COMPARED:
            # Steps 1-2 agree to fp32 rounding; after two updates through Megatron-LM's own
            # optimizer setup the policies differ by ~1e-5 (measured), hence the tolerance.
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (a["step"], key)

    # Megatron's checkpoint of iteration 2 holds the teacher of pretrain_rlp.py's step 2.
    assert (tmp_path / "mlm" / "latest_checkpointed_iteration.txt").read_text() == "3"
    mlm2 = read_tensors(tmp_path / "mlm" / "iter_0000002")
    own2 = read_tensors(latest(own_run / "ckpt").parent / "step_00000002")
    assert TEACHER in mlm2
    torch.testing.assert_close(mlm2[TEACHER], own2[TEACHER], atol=1e-6, rtol=0)
    assert not torch.equal(mlm2[TEACHER], mlm2[TEACHER.removeprefix("ema.")])

    # Resume from iteration 2 with Megatron-LM's --load: the teacher comes back.
    plugin_run("--train-iters", "3", "--load", str(tmp_path / "mlm"), "--ckpt-step", "2",
               "--rlp-metrics-file", str(tmp_path / "r.jsonl"))
    resumed = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["s_ema"] == pytest.approx(got[2]["s_ema"], abs=1e-6)


def test_plugin_packed_update_matches_pretrain_rlp(tmp_path):
    """With shared prefixes (the default) both take the branch-packed update (4 thought rows
    per micro-batch = one document's, packed behind one copy of its window)."""
    ok(*(o for o in OWN if not o.startswith("rlp.share_prefixes")), "train.steps=2",
       f"train.metrics_file={tmp_path}/own.jsonl")
    flags = [f for f in MEGATRON_FLAGS if f != "--rlp-no-share-prefixes"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "examples/megatron_lm/pretrain_gpt_rlp.py", *flags,
                           "--train-iters", "2", "--rlp-metrics-file", f"{tmp_path}/p.jsonl"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ref = rows(tmp_path / "own.jsonl")
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2]
    assert all(r["packed_update"] for r in got)
    for a, b in zip(ref, got, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (a["step"], key)
