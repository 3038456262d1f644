"""Walking a model for its Mamba layers (`LocalMambaMixer`, every pipeline chunk): whether it
has any, the branch layout its packed update registers, and the states a cached prefill
forks from. Kept apart from `branches.py` (the per-layer math the mixer calls) so that the
mixer and the model provider never import each other."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from megatron_rlp.models.mamba.branches import register_layout
from megatron_rlp.models.mamba.mixer import LocalMambaMixer
from megatron_rlp.models.provider import unwrap_model
from megatron_rlp.parallel.pipeline import chunks_of


def mamba_mixers(model: torch.nn.Module) -> list[LocalMambaMixer]:
    """The `LocalMambaMixer` layers of every pipeline chunk of `model`."""
    return [m for c in chunks_of(model) for m in unwrap_model(c).modules()
            if isinstance(m, LocalMambaMixer)]


def has_mamba(model: torch.nn.Module) -> bool:
    """Whether the model (any pipeline chunk) has `LocalMambaMixer` layers."""
    return bool(mamba_mixers(model))


def attach_branch_layout(model: torch.nn.Module, mask: Tensor, branch: Tensor,
                         lo: Tensor, hi: Tensor) -> Tensor:
    """Register the `BranchLayout` of packed sequences (from `packing.tree.pack_branches`'
    branch / lo / hi [N, S]) under their tree mask `mask`, for the model's Mamba layers,
    which look it up from the mask they receive (`branches.layout_of`); returns `mask`. A
    no-op for models without Mamba layers.

    Raises ValueError when a branch's prefix does not start at its window's first column:
    a Mamba state at t_k is that of the scan from there (`data.batches.build_rlp_inputs`'
    prefixes `doc[ws : t_k]`); a later start would need a scan of its own.

    Keyed by the mask's storage, not set on the modules nor as an attribute of the mask:
    activation recomputation re-runs a layer's forward during backward (after this
    micro-batch's forward, possibly after later micro-batches' under pipeline schedules) on
    a detached copy of the mask, which shares its storage. The entry goes when the mask is
    freed (after its backward)."""
    if mamba_mixers(model):
        register_layout(mask, branch, lo, hi)
    return mask


@contextmanager
def mamba_states_at(model: torch.nn.Module, rows: Tensor, ends: Tensor):
    """Within the block, a cached prefill leaves each Mamba layer's cache holding, for
    context b, the states after column ends[b] (exclusive) of window row rows[b]: the
    states of a prefix that starts at the row's first (non-padding) token."""
    mixers = mamba_mixers(model)
    for m in mixers:
        m.fork_at = (rows, ends)
    try:
        yield
    finally:
        for m in mixers:
            m.fork_at = None
