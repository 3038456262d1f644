"""One optimizer update through Megatron's pipeline schedules.

The objective supplies a `forward_step(batch, model) -> (output, loss_func)` pair as in
Megatron-LM's `pretrain_gpt.py`; `get_forward_backward_func` runs the micro-batches (and
the pipeline, when PP > 1); Megatron DDP reduces gradients in `finalize_model_grads`; the
Megatron optimizer clips and steps.

Non-finite losses or gradients skip the update. Megatron's optimizer only checks for inf/NaN
when a loss scaler is active (fp16); its fp32/bf16 path would clip a NaN norm (a no-op: the
clip test `nan < 1` is false) and step Adam into NaN parameters. So the check is done here,
before the optimizer is touched, and agreed on by every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlp.parallel.pipeline import chunks_of
from megatron_rlp.train import faults
from megatron_rlp.train.builder import TrainState
from megatron_rlp.train.compiled_update import update_context


def optimizer_update(state: TrainState, microbatches: list[dict], forward_step: Callable,
                     seq_length: int, extra_passes: Sequence[tuple] = ()
                     ) -> tuple[list[dict], float, bool]:
    """Forward/backward over `microbatches`, then one optimizer + scheduler step.

    Args:
        microbatches: equal-sized dicts of tensors, consumed by `forward_step`.
        seq_length: padded sequence length of the micro-batches (pipeline p2p shapes).
        extra_passes: (micro-batches, forward step, seq length) run first, each through the
            schedule with `finalize_model_grads` held back, so their gradients add to the main
            pass's in DDP's buffers and are reduced once with them (e.g. `train.ntp_mix`).

    Returns:
        (per-micro-batch metric dicts from the loss function (last stage only), grad norm,
        whether the update was applied).
    """
    _zero_grads(state)
    extra_losses = []
    with update_context(state):  # train.compile_update: the layers compiled
        for mbs, step_fn, length in extra_passes:
            with _finalize_held_back(state):
                extra_losses += _forward_backward(state, mbs, step_fn, length)
        losses = _forward_backward(state, microbatches, forward_step, seq_length)
    if faults.planned("nan_grad", state.step + 1):
        _grad_buffers(state)[0].view(-1)[0] = float("nan")
    if not _all_finite(state, losses + extra_losses):
        # Skip: no optimizer, scheduler or parameter change; the caller keeps the teacher.
        _zero_grads(state)
        return losses, float("nan"), False
    applied, grad_norm, _ = state.optimizer.step()
    if applied:
        state.scheduler.step(increment=1)
    return losses, float(grad_norm) if grad_norm is not None else 0.0, bool(applied)


def _forward_backward(state: TrainState, microbatches: list[dict], forward_step: Callable,
                      seq_length: int) -> list[dict]:
    first = next(iter(microbatches[0].values()))
    chunks = state.model_chunks
    # Interleaved pipeline: each chunk reads every micro-batch once, from its own iterator.
    data = iter(microbatches) if len(chunks) == 1 else [iter(microbatches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=first.shape[0],
        forward_only=False,
    )


@contextmanager
def _finalize_held_back(state: TrainState):
    """No `finalize_model_grads` (DP/SP/embedding gradient reductions) at the end of a pass:
    with `overlap_grad_reduce=False` (builder.wrap_ddp) gradients then just accumulate."""
    configs = {id(c.config): c.config for c in chunks_of(state.policy)}.values()
    saved = [(c, c.finalize_model_grads_func) for c in configs]
    for c in configs:
        c.finalize_model_grads_func = None
    try:
        yield
    finally:
        for c, fn in saved:
            c.finalize_model_grads_func = fn


def _zero_grads(state: TrainState) -> None:
    for chunk in state.model_chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()


def _grad_buffers(state: TrainState) -> list[torch.Tensor]:
    """This rank's gradient storage: Megatron DDP's contiguous buffers (every `main_grad` is a
    view into one of them), over all pipeline chunks."""
    grads = []
    for ddp in state.model_chunks:
        buffers = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers",
                                                                   []))
        if buffers:
            grads += [b.grad_data for b in buffers]
        else:
            grads += [p.main_grad for p in ddp.parameters()
                      if getattr(p, "main_grad", None) is not None]
    return grads


@torch.no_grad()
def _all_finite(state: TrainState, losses: list[dict]) -> bool:
    """True on every rank iff every rank's losses and gradients are finite.

    The local check covers this rank's whole gradient buffer (with the distributed optimizer
    that includes the not-yet-reduced parts), so a NaN produced on any rank is seen by that
    rank; one all-reduce(MAX) over the world then makes every rank skip together.
    """
    grads = _grad_buffers(state)
    bad = any(not bool(torch.isfinite(v).all()) for d in losses for v in d.values()
              if isinstance(v, torch.Tensor))
    bad = bad or any(not bool(torch.isfinite(g).all()) for g in grads)
    flag = torch.tensor([int(bad)], dtype=torch.int32, device=grads[0].device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())

