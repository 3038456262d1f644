"""The compute dtype and gate activation that every pure-torch Mamba-2 op (`ops.py`,
`conv.py`, `norm.py`) shares: work in float32 (float64 when an input is float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def activate(x: Tensor, activation: str | bool | None) -> Tensor:
    if activation in (None, False):
        return x
    if activation in ("silu", "swish", True):
        return F.silu(x)
    raise ValueError(f"unsupported activation {activation!r} (allowed: silu, swish, None)")
