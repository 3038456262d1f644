"""Logits at chosen positions only, for the update's gradient forward.

The clipped surrogate needs the next-token distribution at the positions that predict thought
tokens; Megatron's output layer would project every position of `prefix <think> thought` onto
the vocabulary (and keep the [B, S, V] logits and their gradient). Selecting the hidden states
first leaves the math unchanged and skips the prefix positions: at 2048-token prefixes and
150k vocabularies that is most of the output layer's compute and memory.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from torch import Tensor

from megatron_rlp.models.provider import unwrap_model


@contextmanager
def logits_at_positions(model: torch.nn.Module, index: Tensor):
    """Within the block, `model(...)` returns logits only at `index`: [B, L, V/tp] instead of
    [B, S, V/tp], row b's l-th entry being position index[b, l]. Stages without the output
    layer (pipeline parallel) are untouched.

    Under sequence parallel the hidden states are first gathered along the sequence (the
    gradient goes back as each rank's slice) and the output layer runs without it, as
    Megatron's own last-token inference path does.

    Args:
        model: a Megatron language model, possibly DDP-wrapped.
        index: [B, L] long positions (any value in [0, S) where a row has fewer).
    """
    layer = getattr(unwrap_model(model), "output_layer", None)
    if layer is None:
        yield
        return
    forward = layer.forward

    def selected(hidden: Tensor, *args, **kwargs):  # hidden: [S(/tp), B, h]
        sequence_parallel = layer.sequence_parallel
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden,
                                                          tensor_parallel_output_grad=False)
        idx = index.t().to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        layer.sequence_parallel = False
        try:
            return forward(hidden.gather(0, idx), *args, **kwargs)
        finally:
            layer.sequence_parallel = sequence_parallel

    layer.forward = selected
    try:
        yield
    finally:
        del layer.forward  # back to the class method
