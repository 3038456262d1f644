"""Loading a checkpoint (collective): resolve it, verify and read its common state, plan what
to restore (compat.py), read the planned shards through `dist_checkpointing.load`, and put
them into the run. A Megatron-LM save loads its policy through interop/megatron_lm.py.

Megatron functions used: `dist_checkpointing.validation.verify_integrity_manifest`,
`dist_checkpointing.load_common_state_dict`, `dist_checkpointing.load`,
`MegatronOptimizer.load_state_dict`, `OptimizerParamScheduler.load_state_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.validation import verify_integrity_manifest
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from megatron_rlp.checkpoint import patches
from megatron_rlp.checkpoint.compat import LoadPlan, plan_load
from megatron_rlp.checkpoint.directory import INTEGRITY, megatron_lm_dir, resolve_checkpoint
from megatron_rlp.checkpoint.errors import CheckpointError, quiet, reason
from megatron_rlp.checkpoint.optimizer import init_states_to_load, inner_optimizers, restore_steps
from megatron_rlp.checkpoint.rng import set_rng_states
from megatron_rlp.checkpoint.sharded import (
    MODEL,
    REFERENCE,
    TEACHER,
    load_model,
    sharded_state_dict,
)
from megatron_rlp.interop import megatron_lm, names
from megatron_rlp.train.resume import ResumeOptions, match_param_groups, use_checkpoint_schedule

if TYPE_CHECKING:
    from megatron_rlp.train.builder import TrainState


def load_checkpoint(state: TrainState, path: str, checksums: bool = True,
                    counters: dict[str, int] | None = None,
                    options: ResumeOptions | None = None) -> str:
    """Load into `state` (collective). Same objective: resume everything. Other objective
    (e.g. NTP warm-up into RLP), or `options.finetune`: warm-start the policy weights only,
    from step 0.

    Args:
        checksums: verify the SHA-256 manifest, when the checkpoint has one.
        counters: updated in place with the loop counters saved with the checkpoint.
        options: what a resume restores (train/resume.py; default: everything, with the
            configured lr schedule applying from the loaded step).

    Returns:
        A line for the log: "resumed ..." or "warm-started ...".

    Raises:
        CheckpointError: on every rank; `state` may be partly loaded but is not used.
    """
    ckpt = resolve_checkpoint(path)
    if megatron_lm_dir(ckpt) is not None:  # a Megatron-LM torch_dist save: the policy, step 0
        try:
            with quiet():
                return megatron_lm.load_policy(state, ckpt)
        except megatron_lm.MegatronLMError as e:
            raise CheckpointError(str(e)) from None
    common = _read_common(ckpt, checksums)
    plan = plan_load(common, state, ckpt, options or ResumeOptions())
    loaded = _read_shards(state, ckpt, plan)
    load_model(state.policy, loaded["model"], MODEL)
    if plan.resume:
        _restore_training_state(state, ckpt, common, loaded, plan)
        if counters is not None:
            counters.update(common.get("counters") or {})
    return plan.message()


def _read_common(ckpt: Path, checksums: bool) -> dict:
    """The checkpoint's common (non-sharded) state, after the integrity check."""
    with quiet() as logged:
        if checksums and (ckpt / INTEGRITY).is_file():
            try:  # collective: rank 0 hashes every file, the verdict is broadcast
                verify_integrity_manifest(str(ckpt))
            except CheckpointingException as e:
                files = "; ".join(line.strip() for line in str(e).splitlines()[1:])
                raise CheckpointError(f"checkpoint {ckpt} is corrupted (its files do not match "
                                      f"{INTEGRITY}): {files or reason(e)}") from None
        try:
            common = dist_checkpointing.load_common_state_dict(str(ckpt))
        except (Exception, DCPException) as e:  # noqa: BLE001 - unreadable, whatever the cause
            raise CheckpointError(f"cannot read checkpoint {ckpt} (truncated or corrupted?): "
                                  f"{reason(e, logged)}") from None
    if not isinstance(common, dict) or "step" not in common:
        raise CheckpointError(f"checkpoint {ckpt} was not written by megatron-rlp (no step)")
    return common


def _read_shards(state: TrainState, ckpt: Path, plan: LoadPlan) -> dict:
    """`dist_checkpointing.load` of what `plan` restores, into this run's layout."""
    if plan.optimizer and plan.optimizer.startswith("distributed/"):
        init_states_to_load(state)
    with torch.no_grad(), quiet() as logged:
        try:
            sd = sharded_state_dict(state, training=plan.resume, optimizer=plan.optimizer,
                                    teacher=plan.teacher, rng=plan.rng, is_loading=True,
                                    reference=plan.reference)
            names.match_checkpoint_names(sd, ckpt)  # saved before the TE key map: local names
            return dist_checkpointing.load(sd, str(ckpt))
        except (Exception, DCPException) as e:  # noqa: BLE001 - collective: on every rank
            raise CheckpointError(f"cannot load checkpoint {ckpt} (truncated or corrupted?): "
                                  f"{reason(e, logged)}") from None


def _restore_training_state(state: TrainState, ckpt: Path, common: dict, loaded: dict,
                            plan: LoadPlan) -> None:
    """Everything but the policy weights, as `plan` says: optimizer, schedule, teacher,
    reference, RNG, step and consumed tokens."""
    if not plan.override_scheduler:
        use_checkpoint_schedule(state.optimizer, common["scheduler"])
    if plan.optimizer:
        # Pair Adam state with parameters whatever lr / wd either run had (train/resume.py).
        match_param_groups(state.optimizer, loaded["optimizer"])
        try:  # copies into leaf-parameter views
            with torch.no_grad(), patches.step_entries(inner_optimizers(state)):
                state.optimizer.load_state_dict(loaded["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {ckpt}: its optimizer state does not fit this optimizer "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); resume "
                "with train.load_optimizer=false to start Adam afresh") from None
        restore_steps(state)
    # train.override_scheduler: the configured schedule wins (e.g. more train.steps, a new
    # lr), or the checkpoint's; the step count comes from the checkpoint either way.
    state.scheduler.override_opt_param_scheduler = plan.override_scheduler
    state.scheduler.use_checkpoint_opt_param_scheduler = not plan.override_scheduler
    state.scheduler.load_state_dict(common["scheduler"])
    if plan.teacher:
        load_model(state.teacher.model, loaded["teacher"], TEACHER)
        state.teacher.initialized = True
    if plan.reference:
        load_model(state.reference.model, loaded["reference"], REFERENCE)
        state.reference.initialized = True
    if plan.rng:
        set_rng_states(loaded["rng"])
    state.step = int(common["step"])
    state.consumed_tokens = int(common["consumed_tokens"])
