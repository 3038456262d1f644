"""tools/bench_rlp_step.py: times real RLP / NTP steps and writes a JSON a later run can be
compared with (no speed is asserted here: timings belong to the benchmark, not to tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hybrid_layer_pattern=*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2",
         "rlp.contexts_per_step=4", "rlp.group_size=2", "rlp.max_thought_tokens=4",
         "rlp.max_prefix_tokens=48", "model.max_sequence_length=64", "device.num_threads=1",
         "data.ntp_batch_size=4", "data.ntp_seq_length=32"]


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/bench_rlp_step.py", "--config",
                           "examples/configs/tiny_cpu.yaml", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("objective, phases", [("rlp", {"rollout", "scoring", "update"}),
                                               ("ntp", {"update"})])
def test_bench_writes_phase_times_throughput_and_memory(tmp_path, objective, phases):
    out = tmp_path / "bench.json"
    proc = _bench(tmp_path, "--steps", "2", "--warmup", "1", "--out", str(out), *SMALL,
                  f"train.objective={objective}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("[bench] step ")
    res = json.loads(out.read_text())
    assert res["objective"] == objective and res["steps"] == 2 and res["warmup"] == 1
    assert set(res["phases_s"]) == {"step"} | phases
    for summary in res["phases_s"].values():
        assert 0 < summary["min"] <= summary["median"] <= summary["max"]
        assert summary["min"] <= summary["mean"] <= summary["max"]
    for name in phases:  # the phases happen inside the step
        assert res["phases_s"][name]["mean"] < res["phases_s"]["step"]["mean"]
    assert res["throughput"]["tokens_per_s"] > 0
    if objective == "rlp":
        assert res["throughput"]["rollout_decoded_tokens_per_s"] > 0
    assert res["memory"]["peak_bytes"] > 10 * 2**20 and res["memory"]["kind"] == "cpu peak RSS"
    run = res["run"]
    assert (run["world_size"], run["tp"], run["pp"], run["dp"]) == (1, 1, 1, 1)
    assert run["megatron_core"].startswith("0.19") and run["config"]["train"]["objective"] \
        == objective


def test_bench_rejects_bad_input(tmp_path):
    proc = _bench(tmp_path, "--steps", "0")
    assert proc.returncode == 2 and "--steps" in proc.stderr
    proc = _bench(tmp_path, "rlp.group_size=1")
    assert proc.returncode == 2 and "rlp.group_size=1" in proc.stderr
