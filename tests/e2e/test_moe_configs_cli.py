"""The tiny MoE configs as a user runs them (issue 24's "Done when"): `pretrain_rlp.py --config
examples/configs/tiny_moe_cpu.yaml` (and tiny_hybrid_moe_cpu.yaml) trains RLP on one CPU rank,
and under torchrun on two with `parallel.expert_model_parallel_size=2`; every step logs
`routing_agreement`, exactly 1.0 in fp32, and the expert load.

The configs run at their own sizes here (tests/e2e/test_rlp_moe.py and
tests/distributed/test_moe_layouts.py shrink them to prove equalities). Default suite: the
hybrid MoE config under EP=2 (Mamba + attention + MoE through the all-to-all dispatcher, the
case no other test runs from the command line); the other three runs are `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
RUNS = {  # id -> (config, ranks)
    "hybrid-moe-ep2": ("tiny_hybrid_moe_cpu.yaml", 2),
    "hybrid-moe-1rank": ("tiny_hybrid_moe_cpu.yaml", 1),
    "moe-1rank": ("tiny_moe_cpu.yaml", 1),
    "moe-ep2": ("tiny_moe_cpu.yaml", 2),
}


@pytest.mark.parametrize("run", [r if r == "hybrid-moe-ep2" else
                                 pytest.param(r, marks=pytest.mark.slow) for r in RUNS])
def test_tiny_moe_config_runs_rlp_with_exact_routing(run, tmp_path):
    config, ranks = RUNS[run]
    metrics = tmp_path / "metrics.jsonl"
    args = ["pretrain_rlp.py", "--config", f"examples/configs/{config}", "train.steps=2",
            "device.num_threads=1", f"train.metrics_file={metrics}"]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(ranks), *args,
               "parallel.expert_model_parallel_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "route_agree 1.0000" in proc.stdout, proc.stdout[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["routing_agreement"] == 1.0, row
        assert row["moe_expert_load_max"] >= 1.0 and row["moe_dropped_fraction"] == 0.0, row
