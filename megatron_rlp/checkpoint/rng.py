"""RNG state in a checkpoint: every RNG of every rank (Python, NumPy, torch, CUDA on GPU
runs, Megatron's tracker states), one `ShardedObject` per rank, restored exactly when the
layout is the same.

Megatron functions used: `tensor_parallel.get_cuda_rng_tracker().get_states/set_states`,
`parallel_state` ranks, `dist_checkpointing.mapping.ShardedObject`.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rlp.checkpoint.layout import current_layout

if TYPE_CHECKING:
    from megatron_rlp.train.builder import TrainState


def rng_states(cuda: bool) -> dict:
    """Every RNG of this rank, as plain values torch.load(weights_only=True) accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if cuda:
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned (after a save and load)."""
    random.setstate(_tuples(states["python"]))
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def _tuples(x):
    """random.setstate wants the nested tuples that serialization may turn into lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def rng_object(state: TrainState) -> ShardedObject:
    """This rank's RNG states as one shard of a (PP, TP, DP) grid of objects."""
    lay = current_layout()
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    data = rng_states(state.cfg.device.type == "cuda")
    return ShardedObject("rng_state", data, (lay["pp"], lay["tp"], lay["dp"]), offset,
                         replica_id=0)
