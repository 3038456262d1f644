"""Sequence parallel off for token-by-token passes.

Sequence parallel splits activations along the sequence over the TP group; a decode step
has one token per row, which cannot be split. Rollouts and teacher scoring therefore run
the same weights with plain tensor parallel (all-reduce instead of reduce-scatter /
all-gather), which computes the same function; the update keeps sequence parallel.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def sequence_parallel_off(model: torch.nn.Module):
    """Temporarily disable sequence parallel in `model` (its config and every layer flag)."""
    config = model.config
    if not config.sequence_parallel:
        yield
        return
    flags = [(m, name) for m in model.modules() for name in ("sequence_parallel",
                                                            "reduce_scatter_embeddings")
             if isinstance(getattr(m, name, None), bool) and getattr(m, name)]
    config.sequence_parallel = False
    for m, name in flags:
        setattr(m, name, False)
    try:
        yield
    finally:
        config.sequence_parallel = True
        for m, name in flags:
            setattr(m, name, True)
