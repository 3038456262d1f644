"""Cross-rank reductions for metrics: every rank ends up with the global-batch value, so a
DP=2 run reports exactly what a one-rank run over the same batch reports."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor


def gather_data_parallel(t: Tensor) -> Tensor:
    """Concatenate a per-rank tensor along dim 0 in data-parallel rank order."""
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _device(group) -> torch.device:
    """Where a collective's tensor must live: gloo reduces CPU tensors, NCCL CUDA ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_data_parallel(value: float) -> float:
    """Average a scalar over data-parallel ranks (equal local batch sizes)."""
    group = parallel_state.get_data_parallel_group()
    t = torch.tensor([value], dtype=torch.float64, device=_device(group))
    dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group)


def max_data_parallel(value: float) -> float:
    """The largest of a scalar over data-parallel ranks."""
    group = parallel_state.get_data_parallel_group()
    t = torch.tensor([value], dtype=torch.float64, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def share_last_stage_values(values: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """Pipeline parallel: losses exist on the last stage only; share them with every stage."""
    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return values
    last = parallel_state.is_pipeline_last_stage()
    t = torch.tensor([values.get(k, 0.0) if last else 0.0 for k in keys], dtype=torch.float64,
                     device=_device(group))
    dist.all_reduce(t, group=group)
    return {**values, **dict(zip(keys, t.tolist(), strict=True))}
