"""`torchrun` with 2 gloo processes: data- and tensor-parallel RLP runs report what the
one-rank run reports (rewards, losses, grad norms), step by step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SMALL = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=96",
    "rlp.contexts_per_step=4", "rlp.group_size=4", "rlp.max_thought_tokens=6",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=64", "optimizer.lr=1e-2",
    "train.steps=3", "device.num_threads=1",
)
KEYS = ("loss", "reward_mean", "reward_std", "advantage_std", "clip_fraction", "thought_len",
        "s_ema", "s_pred", "grad_norm", "lr")


def run(tmp: Path, nproc: int, *overrides: str) -> list[dict]:
    metrics = tmp / f"metrics_{nproc}_{abs(hash(overrides))}.jsonl"
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "pretrain_rlp.py",
           "--config", "examples/configs/tiny_cpu.yaml", *SMALL, *overrides,
           f"train.metrics_file={metrics}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> list[dict]:
    return run(tmp_path_factory.mktemp("one"), 1)


@pytest.mark.parametrize("layout", [
    pytest.param((), id="dp2"),
    pytest.param(("parallel.tensor_model_parallel_size=2",), id="tp2"),
])
def test_two_ranks_match_one_rank(one_rank, tmp_path, layout):
    rows = run(tmp_path, 2, *layout)
    assert [r["step"] for r in rows] == [r["step"] for r in one_rank] == [1, 2, 3]
    for ref, got in zip(one_rank, rows, strict=True):
        for key in KEYS:
            # abs floor: rewards and losses are differences of O(1) log-probs, near 0
            assert math.isclose(got[key], ref[key], rel_tol=1e-5, abs_tol=1e-5), (
                f"step {ref['step']} {key}: {got[key]} vs one rank {ref[key]}")
