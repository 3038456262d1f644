"""Checkpoints through `megatron.core.dist_checkpointing`: policy, EMA teacher, optimizer,
scheduler, step — resharding-capable, written atomically.

Layout under `train.save`:
    step_00000020/     a complete checkpoint (dist_checkpointing format)
    latest             the name of the newest complete checkpoint (rewritten last)

A save goes to `.tmp_step_*` and is renamed only after every rank finished writing; `latest`
is replaced atomically after that. A crash mid-save leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_rlp.train.builder import TrainState

LATEST = "latest"
_MODEL, _TEACHER = "model.", "ema."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, phrased for the user."""


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def _sharded_state_dict(state: TrainState, with_training_state: bool, is_loading: bool) -> dict:
    model_sd = state.policy.sharded_state_dict(prefix=_MODEL)
    sd = {"model": model_sd}
    if with_training_state:
        sd["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
        if state.teacher is not None and (state.teacher.initialized or is_loading):
            sd["teacher"] = state.teacher.model.sharded_state_dict(prefix=_TEACHER)
    return sd


def save_checkpoint(state: TrainState, root: str) -> Path:
    """Save the full training state of every rank; return the checkpoint directory."""
    root_path = Path(root)
    name = f"step_{state.step:08d}"
    final, tmp = root_path / name, root_path / f".tmp_{name}"
    if dist.get_rank() == 0:
        root_path.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    sd = _sharded_state_dict(state, with_training_state=True, is_loading=False)
    sd.update(
        step=state.step,
        consumed_tokens=state.consumed_tokens,
        objective=state.cfg.train.objective,
        teacher_initialized=bool(state.teacher and state.teacher.initialized),
        scheduler=state.scheduler.state_dict(),
        config=state.cfg.to_dict(),
    )
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root_path / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root_path / LATEST)
    dist.barrier()
    return final


def resolve_checkpoint(path: str) -> Path:
    """`path` is a checkpoint directory or a `train.save` root with a `latest` pointer."""
    p = Path(path)
    if (p / LATEST).is_file():
        p = p / (p / LATEST).read_text().strip()
    if not (p / "metadata.json").is_file():
        raise CheckpointError(f"train.load={path!r} is not a checkpoint (no metadata.json in {p})")
    return p


def load_checkpoint(state: TrainState, path: str) -> str:
    """Load into `state`. Same objective: resume everything. Other objective (e.g. NTP warm-up
    into RLP): warm-start the policy weights only, from step 0.

    Returns:
        "resumed" or "warm-started".
    """
    ckpt = resolve_checkpoint(path)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    resume = common.get("objective") == state.cfg.train.objective
    teacher_saved = bool(common.get("teacher_initialized"))
    sd = _sharded_state_dict(state, with_training_state=resume, is_loading=True)
    if not teacher_saved:
        sd.pop("teacher", None)
    try:
        loaded = dist_checkpointing.load(sd, str(ckpt))
    except Exception as e:  # noqa: BLE001 - reported with the path, never half-applied
        raise CheckpointError(f"cannot load checkpoint {ckpt}: {type(e).__name__}: {e}") from e
    state.policy.load_state_dict(_strip(loaded["model"], _MODEL))
    if not resume:
        return "warm-started"
    state.optimizer.load_state_dict(loaded["optimizer"])
    state.scheduler.load_state_dict(common["scheduler"])
    if state.teacher is not None and teacher_saved:
        state.teacher.model.load_state_dict(_strip(loaded["teacher"], _TEACHER))
        state.teacher.initialized = True
    state.step = int(common["step"])
    state.consumed_tokens = int(common["consumed_tokens"])
    return "resumed"
