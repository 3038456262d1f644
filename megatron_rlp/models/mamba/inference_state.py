"""Decoding state of a hybrid model in Megatron's `StaticInferenceContext`, and forking it.

`ctx.key_value_memory_dict[layer_number]` holds one pair of tensors per layer, **batch on
dim 1 for every layer kind** (the convention `StaticInferenceContext.swap_key_value_dict`
and `rollout.engine.KVCacheEngine.fork` already rely on):
- attention (`*`): `(K, V)`, each `[max_seq, batch, kv_heads, head_dim]` (Megatron's layout);
- Mamba (`M`): `MambaState(conv, ssm)`, `conv [conv_dim, batch, d_conv]` (the last d_conv
  conv inputs) and `ssm [heads, batch, head_dim, d_state]`.

Megatron's `MambaMixer` keeps its states batch-first (`[batch, ...]`). `LocalMambaMixer`
stores them with batch on dim 1 and hands the mixer batch-first *views*
(`batch_first(entry)`); Megatron's in-place updates write through the views. So forking
every entry on dim 1 — what the engine does for attention — is also right for Mamba, and
the mixer sizes its cache from the stored tensors, so it needs no other bookkeeping.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MambaState(NamedTuple):
    """One Mamba layer's decoding state, batch on dim 1."""

    conv: Tensor  # [conv_dim, batch, d_conv]
    ssm: Tensor  # [heads, batch, head_dim, d_state]


def new_mamba_state(batch: int, conv_shape: tuple[int, ...], ssm_shape: tuple[int, ...], *,
                    conv_dtype, ssm_dtype, device) -> MambaState:
    """Zero states for `batch` rows; shapes per row as `MambaMixer.mamba_state_shapes_per_request`
    gives them: conv (conv_dim, d_conv), ssm (heads, head_dim, d_state)."""
    conv = torch.zeros(conv_shape[0], batch, *conv_shape[1:], dtype=conv_dtype, device=device)
    ssm = torch.zeros(ssm_shape[0], batch, *ssm_shape[1:], dtype=ssm_dtype, device=device)
    return MambaState(conv, ssm)


def batch_first(entry) -> tuple[Tensor, Tensor]:
    """Views `(conv [batch, conv_dim, d_conv], ssm [batch, heads, head_dim, d_state])` of a
    stored entry, as Megatron's mixer reads and updates them (in place)."""
    conv, ssm = entry
    return conv.transpose(0, 1), ssm.transpose(0, 1)


def cached_batch_size(entry) -> int:
    return entry[0].shape[1]


def fork_cached_states(ctx, index: Tensor) -> None:
    """Replace every cached row by the rows `index` selects (in place on `ctx`), attention
    K/V and Mamba conv/SSM states alike.

    Row r of the result is old row index[r]: `index = arange(B).repeat_interleave(G)` makes G
    copies of each prompt's state (for G thoughts). Selection copies (never `expand`): both
    attention and the Mamba mixer write their caches in place.

    Args:
        ctx: a `StaticInferenceContext` after a prefill.
        index: [R] long, rows to keep/repeat.
    """
    for layer, entry in list(ctx.key_value_memory_dict.items()):
        a, b = entry
        idx = torch.as_tensor(index, dtype=torch.long, device=a.device)
        ctx.key_value_memory_dict[layer] = type(entry)(a[:, idx], b[:, idx]) if isinstance(
            entry, MambaState) else (a[:, idx], b[:, idx])
