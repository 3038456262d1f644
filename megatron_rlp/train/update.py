"""One optimizer update through Megatron's pipeline schedules.

The objective supplies a `forward_step(batch, model) -> (output, loss_func)` pair as in
Megatron-LM's `pretrain_gpt.py`; `get_forward_backward_func` runs the micro-batches (and
the pipeline, when PP > 1); Megatron DDP reduces gradients in `finalize_model_grads`; the
Megatron optimizer clips and steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlp.train.builder import TrainState


def optimizer_update(state: TrainState, microbatches: list[dict], forward_step: Callable,
                     seq_length: int) -> tuple[list[dict], float, bool]:
    """Forward/backward over `microbatches`, then one optimizer + scheduler step.

    Args:
        microbatches: equal-sized dicts of tensors, consumed by `forward_step`.
        seq_length: padded sequence length of the micro-batches (pipeline p2p shapes).

    Returns:
        (per-micro-batch metric dicts from the loss function (last stage only), grad norm,
        whether the update was applied).
    """
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    first = next(iter(microbatches[0].values()))
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[state.model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=first.shape[0],
        forward_only=False,
    )
    applied, grad_norm, _ = state.optimizer.step()
    if applied:
        state.scheduler.step(increment=1)
    return losses, float(grad_norm) if grad_norm is not None else 0.0, bool(applied)


def split_microbatches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict]:
    """Split every tensor of `batch` along dim 0 into equal micro-batches (0 = one batch)."""
    n = next(iter(batch.values())).shape[0]
    size = micro_batch_size or n
    if n % size:
        raise ValueError(f"train.micro_batch_size={size} must divide the {n} local sequences")
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]
