"""Shared by the checkpoint tests: `pretrain_rlp.main` run in the pytest process (the CLI code
path without the interpreter start-up; one rank), and readers for what a run leaves behind."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/tiny_cpu.yaml"
SMALL = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=96",
    "rlp.contexts_per_step=4", "rlp.group_size=4", "rlp.max_thought_tokens=6",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=64", "optimizer.lr=1e-2",
    "data.ntp_seq_length=32", "data.ntp_batch_size=4", "device.num_threads=1",
)
TIMING = ("step_time", "tokens_per_s", "eta_s")


@dataclass
class Run:
    rc: int
    out: str
    err: str


def _pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_rlp", ROOT / "pretrain_rlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRETRAIN = _pretrain()


@contextlib.contextmanager
def in_process(faults: str = ""):
    """cwd = the repository; the environment (which `distributed.initialize` fills with RANK,
    MASTER_PORT, ...) and the cwd are restored afterwards, so later subprocesses start clean."""
    old_cwd, old_env = Path.cwd(), dict(os.environ)
    os.environ.pop("MEGATRON_RLP_FAULTS", None)
    if faults:
        os.environ["MEGATRON_RLP_FAULTS"] = faults
    try:
        os.chdir(ROOT)
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def main(*overrides: str, faults: str = "") -> Run:
    """`pretrain_rlp.py --config CONFIG SMALL... overrides...` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with in_process(faults), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = PRETRAIN.main(["--config", CONFIG, *SMALL, *overrides])
    return Run(rc, out.getvalue(), err.getvalue())


def ok(*overrides: str, faults: str = "") -> Run:
    run = main(*overrides, faults=faults)
    assert run.rc == 0, run.out[-2000:] + run.err[-2000:]
    return run


def read_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as a global tensor (independent of the saving layout)."""
    reader = FileSystemReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
          if isinstance(v, TensorStorageMetadata)}
    dcp_load(sd, storage_reader=reader, no_dist=True)
    return sd


def latest(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(ref: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got, strict=True):
        for key, value in a.items():
            if key in TIMING or key.startswith("t_"):
                continue
            same = value == b[key] or (isinstance(value, float) and math.isnan(value)
                                       and math.isnan(b[key]))
            assert same, f"step {a['step']} {key}: {b[key]!r} != {value!r}"


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equality of every tensor (policy, EMA teacher, optimizer state)."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
