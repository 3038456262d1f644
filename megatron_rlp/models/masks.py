"""Attention masks in Megatron's convention (bool, True = masked)."""

from __future__ import annotations

import torch
from torch import Tensor

# `branch` values of window and padding tokens in a packed row (`packing.tree`), which the
# tree mask and the Mamba branch layout (`models/mamba/branches.py`) both read.
WINDOW, PAD = -1, -2


def padded_causal_mask(valid: Tensor) -> Tensor:
    """[B, S] bool valid -> [B, 1, S, S] mask: causal, and padding keys hidden from every query.

    Fully masked query rows (padding queries) get a uniform softmax, never NaN: Megatron
    fills masked scores with -10000, not -inf.
    """
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    return ~(causal[None] & valid[:, None, :])[:, None]
