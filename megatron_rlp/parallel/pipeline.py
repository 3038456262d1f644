"""Forward passes outside Megatron's training schedules, across pipeline stages.

Rollouts and teacher scoring are no-gradient forwards that Megatron's
`get_forward_backward_func` does not serve (one token at a time, with a KV cache). Each
stage receives the previous stage's hidden states, runs its layers and sends its output on;
only the last stage has logits. What the last stage derives from them (sampled tokens,
log-probs) is broadcast back so every stage runs the same loop.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import (
    broadcast_from_last_pipeline_stage,
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from torch import Tensor


def pipeline_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def stage_forward(model: torch.nn.Module, tokens: Tensor, positions: Tensor, mask: Tensor | None,
                  **kwargs) -> Tensor | None:
    """This stage's part of `model(tokens, positions, mask, **kwargs)`.

    Returns:
        The model output on the last stage (logits), None on the other stages.
    """
    if pipeline_size() == 1:
        return model(tokens, positions, mask, **kwargs)
    config = model.config
    if not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], config.hidden_size,
                             dtype=config.pipeline_dtype, device=tokens.device)
        recv_from_prev_pipeline_rank_(hidden)
        model.set_input_tensor(hidden)
    out = model(tokens, positions, mask, **kwargs)
    if is_last_stage():
        return out
    send_to_next_pipeline_rank(out.contiguous())
    return None


def from_last_stage(tensor: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Broadcast a tensor computed on the last pipeline stage to every stage."""
    if pipeline_size() == 1:
        return tensor
    return broadcast_from_last_pipeline_stage(list(shape), dtype, tensor)
