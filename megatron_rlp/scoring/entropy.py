"""Next-token entropies from vocab-parallel logits: the `entropy` position strategy's scorer.

RLP can place its contexts where the teacher is least sure of the next token. One no-gradient
forward over each document window gives H(p(. | x_<t)) at every position; the entropy is
computed over the real vocabulary (Megatron's padded ids excluded) with two all-reduces over
the tensor-parallel group, never gathering the vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_rlp.config import PrecisionConfig
from megatron_rlp.data.batches import left_pad
from megatron_rlp.models.fp8 import rollout_precision
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.parallel.pipeline import from_last_stage, stage_forward
from megatron_rlp.parallel.sequence import sequence_parallel_off


def entropy_vocab_parallel(logits: Tensor, vocab_size: int) -> Tensor:
    """H(softmax(logits)) over the real vocabulary for vocab-sharded logits [..., V/tp]."""
    logits = logits.float()
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    ids = torch.arange(start, start + shard, device=logits.device)
    logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group) if dist.is_initialized() else 1
    top = logits.max(-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - top
    e = shifted.exp()
    sums = torch.stack([e.sum(-1), torch.where(e > 0, e * shifted, 0.0).sum(-1)])
    if tp > 1:
        dist.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


@torch.no_grad()
def window_entropies(model: torch.nn.Module, windows: list[np.ndarray], vocab_size: int,
                     pad: int) -> list[np.ndarray]:
    """One forward over left-padded windows; h[j] of window w = entropy after w[:j+1].

    Every tensor/pipeline rank of the model must call this with the same windows.
    """
    device = next(model.parameters()).device
    tokens, valid = (t.to(device) for t in left_pad(windows, pad))
    width = tokens.shape[1]
    positions = torch.arange(width, device=device).expand_as(tokens)
    with sequence_parallel_off(model):
        logits = stage_forward(model, tokens, positions, padded_causal_mask(valid))
    h = None if logits is None else entropy_vocab_parallel(logits, vocab_size)
    h = from_last_stage(h, (len(windows), width), torch.float32)
    h = h.cpu()  # one device-to-host copy for all windows (the sampler works in numpy)
    return [h[i, width - len(w):].numpy().copy() for i, w in enumerate(windows)]


def model_entropy_scorer(get_model: Callable[[], torch.nn.Module], vocab_size: int, pad: int,
                         precision: PrecisionConfig | None = None
                         ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A `PositionScorer` running `get_model()` (called at each use, e.g. the current teacher).

    With `precision`, the forward runs under `rollout_precision` like the rollouts and the
    teacher's scoring (models/fp8.py): bf16 under FP8 training unless `fp8_rollouts`, so
    that positions are chosen by the same model that scores them, and TE never sees the
    windows' unaligned row counts."""

    def score(windows: list[np.ndarray]) -> list[np.ndarray]:
        model = get_model()
        was_training = model.training
        model.eval()
        context = (contextlib.nullcontext() if precision is None
                   else rollout_precision(precision, model))
        try:
            with context:
                return window_entropies(model, windows, vocab_size, pad)
        finally:
            model.train(was_training)

    return score
