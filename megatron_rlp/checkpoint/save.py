"""Saving a checkpoint (collective): every rank writes its shards of the sharded state dict
into `.tmp_step_N` through `dist_checkpointing.save`; only when all ranks succeeded does rank 0
publish it (directory.py). A failure on any rank is one `CheckpointError` on every rank, and
leaves `latest` and every earlier checkpoint untouched.

Megatron functions used: `dist_checkpointing.save(sharded_state_dict, dir,
verify_integrity=...)` (with patches.py's thread queue), `OptimizerParamScheduler.state_dict`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from megatron_rlp.checkpoint import directory, patches
from megatron_rlp.checkpoint.compat import model_signature
from megatron_rlp.checkpoint.errors import CheckpointError, agree, on_rank0, quiet, rank, reason
from megatron_rlp.checkpoint.layout import current_layout
from megatron_rlp.checkpoint.optimizer import optimizer_has_state, optimizer_kind
from megatron_rlp.checkpoint.sharded import sharded_state_dict

if TYPE_CHECKING:
    from megatron_rlp.train.builder import TrainState

FORMAT_VERSION = 2


def save_checkpoint(state: TrainState, root: str, keep_last: int = 0, checksums: bool = True,
                    counters: dict[str, int] | None = None,
                    dist_optimizer_format: str = "dp_reshardable") -> Path:
    """Save the full training state of every rank (collective); return the checkpoint dir.

    Args:
        keep_last: after the save, remove all but this many newest checkpoints (0 = keep all).
        checksums: also write a SHA-256 manifest (verified by `load_checkpoint`).
        counters: loop counters to restore on resume (e.g. skipped steps).
        dist_optimizer_format: one of DIST_OPT_FORMATS (with the distributed optimizer).

    Raises:
        CheckpointError: on every rank, if any rank failed; `latest` and every earlier
            checkpoint are then untouched, and the partial save is removed.
    """
    root_path = Path(root)
    name = directory.step_name(state.step)
    final, tmp = root_path / name, root_path / f".tmp_{name}"
    previous = directory.latest_checkpoint(root_path)
    keep_msg = (f"the last checkpoint is unchanged ({previous})" if previous
                else "no earlier checkpoint exists")
    on_rank0(lambda: directory.prepare_save(root_path, tmp, previous),
             f"cannot save checkpoint {final}; {keep_msg}")

    sd = _state_to_save(state, counters, dist_optimizer_format)
    error = None
    patches.use_thread_queue()
    with quiet() as logged:
        try:
            with patches.writer_faults(state.step):
                dist_checkpointing.save(sd, str(tmp), verify_integrity=checksums)
        except (Exception, DCPException) as e:  # noqa: BLE001 - agreed on below, one line
            error = f"saving checkpoint {final} failed: {reason(e, logged)}; {keep_msg}"
    try:
        agree(error)
    except CheckpointError:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    on_rank0(lambda: directory.publish(root_path, tmp, state.step, keep_last),
             f"cannot publish checkpoint {final}; {keep_msg}")
    return final


def _state_to_save(state: TrainState, counters: dict[str, int] | None,
                   dist_optimizer_format: str) -> dict:
    """The sharded state dict with the common state `load_checkpoint` plans from."""
    teacher = state.teacher is not None and state.teacher.initialized
    optimizer = (optimizer_kind(state, dist_optimizer_format) if optimizer_has_state(state)
                 else None)
    reference = getattr(state, "reference", None) is not None and state.reference.initialized
    sd = sharded_state_dict(state, training=True, optimizer=optimizer, teacher=teacher,
                            rng=True, is_loading=False, reference=reference)
    sd.update(
        format_version=FORMAT_VERSION,
        step=state.step,
        consumed_tokens=state.consumed_tokens,
        counters=dict(counters or {}),
        objective=state.cfg.train.objective,
        teacher_initialized=teacher,
        reference_initialized=reference,
        optimizer_saved=optimizer is not None,
        optimizer_kind=optimizer or "",
        scheduler=state.scheduler.state_dict(),
        layout=current_layout(),
        model_signature=model_signature(state),
        config=state.cfg.to_dict(),
    )
    return sd
