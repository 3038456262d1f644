"""The sharded state dict of a checkpoint: policy, optimizer, EMA teacher, KL reference and
RNG, each from Megatron's own `sharded_state_dict`, so `dist_checkpointing` can write it and
reload it into another TP/PP/DP layout; and loading the models back from what it returns.

Megatron functions used: `MegatronModule.sharded_state_dict`,
`MegatronOptimizer.sharded_state_dict(model_sd, is_loading, metadata)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_rlp.checkpoint.optimizer import zero_padding
from megatron_rlp.checkpoint.rng import rng_object
from megatron_rlp.parallel.pipeline import ModelChunks

if TYPE_CHECKING:
    from megatron_rlp.train.builder import TrainState

# Key prefixes of the models' tensors.
MODEL, TEACHER = "model.", "ema."
REFERENCE = "ref."  # the KL reference policy (rlp.kl_coef > 0, scoring/reference.py)


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def _model_sharded_state_dict(model: torch.nn.Module, prefix: str) -> dict:
    """A model's sharded state dict; an interleaved pipeline's chunks nest as chunk0, chunk1..
    (their tensors carry global layer keys, so any layout loads them)."""
    if isinstance(model, ModelChunks):
        return {f"chunk{i}": c.sharded_state_dict(prefix=prefix) for i, c in enumerate(model)}
    return model.sharded_state_dict(prefix=prefix)


def load_model(model: torch.nn.Module, loaded: dict, prefix: str) -> None:
    """Load `loaded` (a model's part of `dist_checkpointing.load`'s result) into `model`."""
    if isinstance(model, ModelChunks):
        for i, chunk in enumerate(model):
            chunk.load_state_dict(_strip(loaded[f"chunk{i}"], prefix))
    else:
        model.load_state_dict(_strip(loaded, prefix))


def sharded_state_dict(state: TrainState, *, training: bool, optimizer: str | None,
                       teacher: bool, rng: bool, is_loading: bool,
                       reference: bool = False) -> dict:
    """The policy's sharded state dict under "model"; with `training`, also "optimizer"
    (`optimizer`: None for no optimizer state, or the kind from `optimizer.optimizer_kind`),
    "teacher", "reference" and "rng" as asked."""
    model_sd = _model_sharded_state_dict(state.policy, MODEL)
    sd = {"model": model_sd}
    if training and optimizer:
        meta = None
        if optimizer.startswith("distributed/"):
            meta = {"distrib_optim_sharding_type": optimizer.split("/")[1]}
        sd["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                             metadata=meta)
        if not is_loading:
            zero_padding(sd["optimizer"])
    if training and teacher:
        sd["teacher"] = _model_sharded_state_dict(state.teacher.model, TEACHER)
    if training and reference:
        sd["reference"] = _model_sharded_state_dict(state.reference.model, REFERENCE)
    if training and rng:
        sd["rng"] = rng_object(state)
    return sd
