"""Megatron's tensor-parallel group lookup without its per-call deprecation warning.

Megatron-Core 0.19's `RowParallelLinear.forward` passes `tp_group=None` to
`linear_with_grad_accumulation_and_async_allreduce` at every call, which then calls
`get_tensor_model_parallel_group_if_none`: a `DeprecationWarning` (filtered, but raised
through `warnings.warn` and `torch.distributed.get_rank` each time) before it returns the
default group. A rollout's decode step calls it twice per layer; profiled at 0.8M that is
~3% of an eager decode step (tools/profile_rollout.py), and `warnings.warn` with keyword
arguments breaks a torch.compile graph at every linear layer (packing/compiled.py).

`quiet_tp_group()` swaps in `tp_group_quietly` for a block: the same group, no warning.
Written here because Megatron offers no switch for it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import layers as tp_layers


def tp_group_quietly(tp_group, is_expert=False, check_initialized=True):
    """`megatron.core.utils.get_tensor_model_parallel_group_if_none` without its warning:
    `tp_group` itself, else the (expert) tensor-parallel group once the groups exist."""
    if tp_group is not None or not torch.distributed.is_initialized():
        return tp_group
    if not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


@contextmanager
def quiet_tp_group():
    """`tp_group_quietly` in place of Megatron's lookup in its linear layers for the block."""
    original = tp_layers.get_tensor_model_parallel_group_if_none
    tp_layers.get_tensor_model_parallel_group_if_none = tp_group_quietly
    try:
        yield
    finally:
        tp_layers.get_tensor_model_parallel_group_if_none = original
