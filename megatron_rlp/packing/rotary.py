"""Rotary embeddings at given position ids, for packed sequences.

Megatron's language models build RoPE from the sequence length alone
(`RotaryEmbedding.forward(max_seq_len)` -> positions 0..S-1, [S, 1, 1, dim]); the
`position_ids` argument only feeds learned absolute embeddings. A packed sequence's branches
continue from their prefix ends, so within this block the rotary module returns the
embedding of each token's own position instead: [S, B, 1, dim], which Megatron's
`apply_rotary_pos_emb` (bshd, unfused) broadcasts over heads exactly as the [S, 1, 1, dim]
one. Only relative positions reach the attention scores, so a branch token at position
e_k + j scores its prefix keys as the unpacked row does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from megatron_rlp.models.provider import unwrap_model
from megatron_rlp.parallel.pipeline import chunks_of


@contextmanager
def rotary_at_positions(model: torch.nn.Module, positions: Tensor):
    """Within the block, the model's RoPE uses `positions` ([B, S] long) per token.

    Models without RoPE (learned or no position embeddings) are left alone: learned ones
    already read `position_ids`. Raises ValueError for fused RoPE (`apply_rope_fusion`),
    whose kernels take one position table for the whole batch.
    """
    modules = [getattr(unwrap_model(c), "rotary_pos_emb", None) for c in chunks_of(model)]
    modules = [m for m in modules if m is not None]
    for m in modules:
        if getattr(m, "config", None) is not None and getattr(m.config, "apply_rope_fusion",
                                                              False):
            raise ValueError("packed sequences need unfused RoPE (apply_rope_fusion=False)")

    def per_token(module, *args, **kwargs):
        emb = module.get_emb(int(positions.max()) + 1)[:, 0, 0]  # [P, dim]
        return emb[positions.t().to(emb.device)][:, :, None, :]  # [S, B, 1, dim]

    for m in modules:
        m.forward = per_token.__get__(m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward  # back to the class method
