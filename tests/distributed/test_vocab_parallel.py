"""Sampling and scoring on vocabulary shards (TP=2, gloo) equal the full-vocabulary result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def test_vocab_parallel_sampling_matches_full_vocabulary():
    worker = Path(__file__).with_name("vocab_parallel_worker.py")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(worker), "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
