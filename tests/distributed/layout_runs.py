"""Shared by the layout-equivalence tests: train a few steps under torchrun, return the
metrics rows and the final checkpoint's model tensors (read without a process group). Every
run also records its steps' internals in `tmp/record` (`MEGATRON_RLP_RECORD`, see
megatron_rlp/train/record.py and tests/helpers/step_reference.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def train_and_collect(tmp: Path, nproc: int, config: str, *overrides: str
                      ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """`torchrun pretrain_rlp.py --config config overrides...`; (metrics rows, parameters)."""
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "pretrain_rlp.py",
           "--config", config, *overrides,
           f"train.metrics_file={tmp / 'metrics.jsonl'}", f"train.save={tmp / 'ckpt'}"]
    env = {**os.environ, "MEGATRON_RLP_RECORD": str(tmp / "record")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    latest = (tmp / "ckpt" / "latest").read_text().strip()
    dcp_to_torch_save(tmp / "ckpt" / latest, tmp / "final.pt")
    state = torch.load(tmp / "final.pt", weights_only=False)
    params = {k: v for k, v in state.items() if k.startswith("model.")
              and isinstance(v, torch.Tensor) and "_extra_state" not in k}
    return rows, params
