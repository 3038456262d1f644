"""Optimizer state formats in a checkpoint: which optimizer a run has (local, or Megatron's
distributed one and its checkpoint format), whether Adam has state yet, and the fix-ups the
distributed optimizer's state needs around a save or load.

Distributed-optimizer formats (Megatron's default `fully_sharded_model_space` fails on save:
shared/MEGATRON_CPU.md). `dp_reshardable`: every rank writes its own flat shards, no
communication; reloads with any DP size but the same TP/PP. `fully_reshardable`: gathers each
parameter's state over DP on save; reloads into any TP/PP/DP layout.

Megatron functions used: `DistributedOptimizer` (`chained_optimizers`,
`_init_optimizer_states_with_dummy_values`), `dist_checkpointing.mapping`
(`LocalNonpersistentObject`, `ShardedTensor`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

if TYPE_CHECKING:
    from megatron_rlp.train.builder import TrainState

DIST_OPT_FORMATS = ("dp_reshardable", "fully_reshardable")


def inner_optimizers(state: TrainState) -> list:
    """The optimizers of a `ChainedOptimizer`, or [the optimizer]."""
    opt = state.optimizer
    return list(getattr(opt, "chained_optimizers", [opt]))


def _distributed_optimizer(state: TrainState) -> bool:
    return any(isinstance(o, DistributedOptimizer) for o in inner_optimizers(state))


def optimizer_has_state(state: TrainState) -> bool:
    """Adam's state is created lazily by the first applied step."""
    return any(len(o.optimizer.state) > 0 for o in inner_optimizers(state)
               if getattr(o, "optimizer", None) is not None)


def optimizer_kind(state: TrainState, dist_format: str) -> str:
    """"local", or "distributed/<dist_format>" (one of DIST_OPT_FORMATS) as saved."""
    return f"distributed/{dist_format}" if _distributed_optimizer(state) else "local"


def zero_padding(tree) -> None:
    """`dp_reshardable` saves the gaps between parameters in the optimizer's flat buckets as
    `torch.empty` tensors (marked `padding`): zero them so a checkpoint's bytes depend only on
    the training state (and identical runs give identical files)."""
    if isinstance(tree, dict):
        pad = tree.get("padding")
        if isinstance(pad, LocalNonpersistentObject) and pad.obj is True:
            for v in tree.values():
                if isinstance(v, ShardedTensor):
                    v.data.zero_()
        for v in tree.values():
            zero_padding(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            zero_padding(v)


def init_states_to_load(state: TrainState) -> None:
    """Give every distributed optimizer the (dummy) Adam state a checkpoint loads into."""
    for o in inner_optimizers(state):
        if isinstance(o, DistributedOptimizer):
            o._init_optimizer_states_with_dummy_values()


def restore_steps(state: TrainState) -> None:
    """Give every parameter of a distributed optimizer its own Adam `step`, from the param
    groups (where Megatron keeps it without Apex/TE). Loading leaves one tensor shared by all
    parameters (torch Adam then advances it once per parameter), and `dp_reshardable` even
    leaves the dummy state's step 1 in place."""
    for o in inner_optimizers(state):
        if not isinstance(o, DistributedOptimizer):
            continue
        for group in o.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                s = o.optimizer.state.get(p)
                if s is not None and isinstance(s.get("step"), torch.Tensor):
                    s["step"] = torch.tensor(float(group["step"]), dtype=s["step"].dtype,
                                             device=s["step"].device)
