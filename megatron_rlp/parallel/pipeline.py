"""Forward passes outside Megatron's training schedules, across pipeline stages.

Rollouts and teacher scoring are no-gradient forwards that Megatron's
`get_forward_backward_func` does not serve (one token at a time, with a KV cache). Each
stage receives the previous stage's hidden states, runs its layers and sends its output on;
only the last stage has logits. What the last stage derives from them (sampled tokens,
log-probs) is broadcast back so every stage runs the same loop.

With an interleaved (virtual) pipeline a rank holds several model chunks (`ModelChunks`),
and one forward visits the ranks round after round: chunk 0 of ranks 0..PP-1, then chunk 1
of ranks 0..PP-1, and so on; the p2p ring (last rank -> first) carries the hidden states
from one round to the next.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import (
    broadcast_from_last_pipeline_stage,
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from torch import Tensor, nn


def pipeline_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


class ModelChunks(nn.ModuleList):
    """This rank's chunks of one model under an interleaved pipeline, in layer order (chunk i
    holds pattern segment i * PP + pipeline rank). Reads like one model where the rollout and
    scoring code looks: `config`, and `output_layer` (the last chunk's, if it has one)."""

    @property
    def config(self):
        return self[0].config

    @property
    def output_layer(self) -> nn.Module | None:
        return getattr(self[-1], "output_layer", None)


def chunks_of(model: nn.Module) -> list[nn.Module]:
    """A model's chunks in layer order: those of `ModelChunks`, else the model alone."""
    return list(model) if isinstance(model, ModelChunks) else [model]


def _chunk_forward(model: nn.Module, first: bool, last: bool, tokens: Tensor, positions: Tensor,
                   mask: Tensor | None, **kwargs) -> Tensor | None:
    config = model.config
    if not first:
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], config.hidden_size,
                             dtype=config.pipeline_dtype, device=tokens.device)
        recv_from_prev_pipeline_rank_(hidden)
        model.set_input_tensor(hidden)
    out = model(tokens, positions, mask, **kwargs)
    if last:
        return out
    send_to_next_pipeline_rank(out.contiguous())
    return None


def stage_forward(model: nn.Module, tokens: Tensor, positions: Tensor, mask: Tensor | None,
                  **kwargs) -> Tensor | None:
    """This rank's part of `model(tokens, positions, mask, **kwargs)`: one stage, or every
    chunk of an interleaved pipeline in turn.

    Returns:
        The model output on the last stage (logits), None on the other stages.
    """
    if pipeline_size() == 1:
        return model(tokens, positions, mask, **kwargs)
    first_rank = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    chunks = chunks_of(model)
    out = None
    for i, chunk in enumerate(chunks):
        last = is_last_stage() and i == len(chunks) - 1
        out = _chunk_forward(chunk, first_rank and i == 0, last, tokens, positions, mask,
                             **kwargs)
    return out


def from_last_stage(tensor: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Broadcast a tensor computed on the last pipeline stage to every stage."""
    if pipeline_size() == 1:
        return tensor
    return broadcast_from_last_pipeline_stage(list(shape), dtype, tensor)
