"""The update's forward over a micro-batch, set up once for every model that reads it.

The policy's gradient forward (`train.rlp_update.rlp_forward_step`) and the frozen
reference's log-probs (`scoring.reference.reference_logprobs`) read the same micro-batches,
so they must run the same forward. `packed_forward` sets it up:

- logits only at `batch["index"]`, the positions that predict thought tokens
  (`models.output_positions`);
- for a branch-packed micro-batch (`packing.update`: it has `branch`, `lo`, `hi`):
  - the tree as the attention mask: the explicit [B, 1, S, S] mask (`packing.tree`), with
    Mamba layers starting every branch from the window's state at its t_k
    (`models.mamba.model_walk.attach_branch_layout`); with `attention="split"` the same mask
    with its layout registered, which the routed core attentions compute window and
    branches apart (`packing.split_attention`); or, with `attention="flex"`, the [B, 3, S]
    tree descriptor that `packing.flex` routes to FlexAttention;
  - RoPE at each token's own position (`packing.rotary`), since a branch's tokens sit after
    the window and the other branches of its sequence.

An unpacked micro-batch (one causal row per thought) needs only the first item: its mask is
None (Megatron's causal mask) and its positions are 0..S-1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from megatron_rlp.models.mamba.model_walk import attach_branch_layout
from megatron_rlp.models.output_positions import logits_at_positions
from megatron_rlp.packing import split_attention
from megatron_rlp.packing.flex import block_mask_for, route_core_attention, tree_descriptors
from megatron_rlp.packing.rotary import rotary_at_positions
from megatron_rlp.packing.tree import tree_mask


@contextlib.contextmanager
def packed_forward(model: nn.Module, batch: dict[str, Tensor], attention: str = "mask"
                   ) -> Iterator[Tensor | None]:
    """Set `model` (a module or pipeline chunks) up for `batch` and yield the attention mask
    to call it with: `model(batch["tokens"], batch["positions"], mask)`.

    Args:
        batch: tokens, positions [B, S]; index [B, K]; a packed one also branch, lo, hi [B, S].
        attention: `mask` (the [B, 1, S, S] bool tree mask), `split` (that mask, computed by
            `packing.split_attention`) or `flex` (the [B, 3, S] long tree descriptor;
            attention-only models, config refuses flex with Mamba layers).

    Yields:
        None for an unpacked batch, else the tree mask or descriptor.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(logits_at_positions(model, batch["index"]))
        mask = None
        if "branch" in batch:
            branch, lo, hi = batch["branch"], batch["lo"], batch["hi"]
            if attention == "flex":
                route_core_attention(model)
                mask = tree_descriptors(branch, lo, hi)
                block_mask_for(mask)  # built once here; every layer (and recompute) reuses it
            else:
                mask = tree_mask(branch, lo, hi)
                attach_branch_layout(model, mask, branch, lo, hi)  # Mamba: branches from t_k
                if attention == "split":
                    split_attention.route_core_attention(model)
                    split_attention.register_layout(mask, branch, lo, hi)
            stack.enter_context(rotary_at_positions(model, batch["positions"]))
        yield mask
