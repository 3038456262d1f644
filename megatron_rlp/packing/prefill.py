"""Shared-prefix rollout prefill: one forward per document window serves all its positions.

The per-context prefill encodes `doc[ws : t_k] <think>` for every context k, so a document
with ppd positions is encoded ppd times. Here its window `doc[ws : t_max]` (ws = max(0, t_min -
max_prefix): every context's full prefix, `data.batches`) is encoded once
(`KVCacheEngine`'s static cache, D rows); each context's cache row is then cut from its
document's row: the prefix columns [s_k, e_k) are moved to end at the window's last column,
the later columns masked, and `<think>` is fed as the first decode step.

Why moving columns is exact: Megatron's static-batching attention caches keys *before* RoPE
and rotates every cached key by its cache slot when it is read, so after the move a context
sees its prefix at the relative positions a left-padded prompt of the window's width has,
which is what the per-context path computes (left padding is exact, see rollout/engine.py).
Moved columns are one gather per layer ([W, B] indices); the G thought branches then fork
from the B context rows as before.

Mamba layers (hybrid models) have no columns to move: during the window prefill each one
caches, per context, its conv state (the inputs before e_k) and SSM state after column e_k
of the window scan (`models.mamba.model_walk.mamba_states_at`), which is the state the
per-context prefill of `doc[ws : t_k]` reaches (padding leaves the state unchanged, see
`models.mamba.mixer`); `<think>` and the thoughts then decode from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlp.models.mamba.inference_state import MambaState
from megatron_rlp.models.mamba.model_walk import has_mamba, mamba_states_at
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.packing.decode import SharedPrefixEngine
from megatron_rlp.rollout.template import lead_ids


@dataclass
class SharedWindows:
    """Document windows and where each context's prefix lies in them.

    Attributes:
        tokens, valid: [D, W] left-padded windows (`data.batches.DocumentWindows`).
        rows: [B] long, window row of each context.
        ends: [B] long, end column (exclusive) of each context's prefix in its row; the
            prefix is the `lengths[b]` columns before it.
        lengths: [B] long, prefix lengths.
    """

    tokens: Tensor
    valid: Tensor
    rows: Tensor
    ends: Tensor
    lengths: Tensor
    cascade: bool = True  # the rollout engine's cache (packing/decode.SharedPrefixEngine)
    compile: bool = False  # its compiled decode step (packing/compiled.py)

    @classmethod
    def from_windows(cls, windows, prompts, cascade: bool = True,
                     compile: bool = False) -> SharedWindows:
        return cls(tokens=windows.tokens, valid=windows.valid, rows=windows.rows,
                   ends=windows.cols + 1, lengths=prompts.lengths, cascade=cascade,
                   compile=compile)

    def chunk(self, start: int, end: int) -> SharedWindows:
        """Contexts [start, end), with only the windows they use."""
        rows = self.rows[start:end]
        used, inverse = torch.unique(rows, return_inverse=True)
        return SharedWindows(tokens=self.tokens[used], valid=self.valid[used], rows=inverse,
                             ends=self.ends[start:end], lengths=self.lengths[start:end],
                             cascade=self.cascade, compile=self.compile)

    # What `rollout.thoughts.sample_thoughts` calls on its `shared` argument: the rollout
    # gets the shared-prefix engine and prefill from here, so it never imports packing.

    def engine(self, model: torch.nn.Module, max_batch_size: int, max_sequence_length: int):
        """A fresh `packing.decode.SharedPrefixEngine` for these windows' rollout."""
        return SharedPrefixEngine(model, max_batch_size=max_batch_size,
                                  max_sequence_length=max_sequence_length,
                                  cascade=self.cascade, compile=self.compile)

    def prefill(self, engine, think_start) -> Tensor | None:
        """`prefill_shared(engine, self, think_start)`."""
        return prefill_shared(engine, self, think_start)


@torch.no_grad()
def prefill_shared(engine, shared: SharedWindows, think_start) -> Tensor | None:
    """Encode each window once, cut one cache row per context, feed `<think>` (or a
    template's lead `after <think>`, one decode step per id: it follows each context's own
    prefix, so it cannot be part of the shared window; `rollout.template`).

    Args:
        engine: a fresh `rollout.engine.KVCacheEngine` (or `packing.decode.SharedPrefixEngine`,
            whose cache is then rotated once) with max_sequence_length >= W + lead length.
        shared: the windows and prefixes.
        think_start: the `<think>` id, or a list of lead ids ending with it.

    Returns:
        [B, V/tp] fp32 logits after each context's `prefix <think>` (last pipeline stage,
        else None), as `KVCacheEngine.prefill` returns for the per-context prompts.
    """
    ctx = engine.ctx
    ctx.reset()
    ctx.key_value_memory_dict.clear()
    d, w = shared.tokens.shape
    if hasattr(engine, "limit_prefix"):  # cascade: the cache holds the D windows' P columns
        engine.limit_prefix(d, w + len(lead_ids(think_start)))
    device = shared.tokens.device
    engine.key_valid = torch.zeros(d, ctx.max_sequence_length, dtype=torch.bool, device=device)
    engine.key_valid[:, :w] = shared.valid
    rows = shared.rows.to(device)
    first = (~shared.valid).sum(1)[rows]  # each row's first token (left padding)
    if has_mamba(engine.model) and bool((shared.ends - shared.lengths != first).any()):
        raise ValueError("Mamba layers need every context's prefix to start at its window's "
                         "first token (their state at t_k is the window scan's)")
    with mamba_states_at(engine.model, rows, shared.ends.to(device)):
        engine._forward(shared.tokens, padded_causal_mask(shared.valid))

    # Column j of context b's row holds window column j - shift[b]: its prefix ends at w.
    shift = w - shared.ends.to(device)  # [B]
    src = (torch.arange(w, device=device)[:, None] - shift[None, :]).clamp(0, w - 1)  # [W, B]
    for layer, entry in list(ctx.key_value_memory_dict.items()):
        if isinstance(entry, MambaState):  # already one row per context
            continue
        moved = []
        for cache in entry:  # [max_seq, batch, heads, dim]
            out = cache[:, rows]  # a copy, [max_seq, B, ...]
            out[:w] = cache[src, rows[None, :]]
            moved.append(out)
        ctx.key_value_memory_dict[layer] = tuple(moved)
    cols = torch.arange(ctx.max_sequence_length, device=device)
    start = w - shared.lengths.to(device)
    engine.key_valid = (cols[None] >= start[:, None]) & (cols[None] < w)
    if hasattr(engine, "rotate_cache"):  # `packing.decode.SharedPrefixEngine`
        engine.rotate_cache()
    logits = None
    for token in lead_ids(think_start):
        logits = engine.step(torch.full((len(rows),), token, dtype=torch.long, device=device))
    return logits
