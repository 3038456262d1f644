"""`pretrain_rlp.py` as users run it: bad input is one line and a non-zero exit; the shipped
demo config trains under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
CONFIG = "examples/configs/tiny_cpu.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain_rlp.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, key", [
    ("rlp.group_size=1", "rlp.group_size"),
    ("rlp.thoughts=4", "rlp.thoughts"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("train.load=/nonexistent/ckpt", "train.load"),
])
def test_bad_override_is_one_line(override, key):
    proc = cli("--config", CONFIG, override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_missing_config_file_is_one_line():
    proc = cli("--config", "examples/configs/nope.yaml")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_demo_config_runs_under_torchrun(tmp_path):
    """The demo's own config and launch shape (2 ranks, DP=2), for a few steps of each stage."""
    metrics = tmp_path / "m.jsonl"
    base = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "pretrain_rlp.py",
            "--config", CONFIG, "device.num_threads=1"]
    ntp = subprocess.run(base + ["train.objective=ntp", "train.steps=2",
                                 f"train.save={tmp_path / 'ntp'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ntp.returncode == 0, ntp.stderr[-3000:]
    assert (tmp_path / "ntp" / "latest").read_text().strip() == "step_00000002"
    rlp = subprocess.run(base + ["train.steps=2", f"train.load={tmp_path / 'ntp'}",
                                 f"train.metrics_file={metrics}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rlp.returncode == 0, rlp.stderr[-3000:]
    assert "warm-started" in rlp.stdout and "[rlp step     2]" in rlp.stdout
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"t_rollout", "t_scoring", "t_update", "tokens_per_s"} <= rows[0].keys()
