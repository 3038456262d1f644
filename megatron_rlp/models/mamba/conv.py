"""Depthwise causal conv1d in plain PyTorch, standing in for the `causal_conv1d` package's
`causal_conv1d_fn` / `causal_conv1d_update` (channel-first, [batch, dim, len]) on machines
without it. Re-exported by `ops.py`, whose table lists every stand-in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_rlp.models.mamba.elementwise import activate, compute_dtype


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: Tensor | None = None,
    activation: str | None = None,
):
    """Depthwise causal convolution.

    Args:
        x: [batch, dim, seqlen].
        weight: [dim, width]; bias: [dim].
        initial_states: [batch, dim, width - 1], the inputs before position 0 (zeros if None).
        return_final_states: also return the last width - 1 inputs (the decoding state).
        activation: None, "silu" or "swish".

    Returns:
        [batch, dim, seqlen] in x's dtype (and [batch, dim, width - 1] final states).
    """
    if seq_idx is not None:
        raise NotImplementedError("seq_idx (packed sequences) is not supported")
    b, d, length = x.shape
    w = weight.shape[-1]
    cd = compute_dtype(x, weight)
    xf = x.to(cd)
    if initial_states is None:
        xp = F.pad(xf, (w - 1, 0))
    else:
        xp = torch.cat([initial_states.to(cd), xf], dim=-1)
    out = F.conv1d(xp, weight.to(cd)[:, None, :], None if bias is None else bias.to(cd),
                   groups=d)
    out = activate(out, activation).to(x.dtype)
    if not return_final_states:
        return out
    final = xp[..., -(w - 1):].to(x.dtype) if w > 1 else xp[..., :0].to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | bool | None = None,
    cache_seqlens: Tensor | None = None,
    conv_state_indices: Tensor | None = None,
) -> Tensor:
    """Advance the causal convolution by one (or a few) positions, updating `conv_state`.

    Args:
        x: [batch, dim] or [batch, dim, seqlen] new inputs.
        conv_state: [batch, dim, state_len] (state_len >= width - 1) last inputs, oldest
            first; shifted left and appended to in place.
        weight: [dim, width]; bias: [dim].
        conv_state_indices: [batch] rows of `conv_state` to use (default: 0..batch-1).

    Returns:
        Conv outputs shaped like x.
    """
    if cache_seqlens is not None:
        raise NotImplementedError("circular conv state (cache_seqlens) is not supported")
    squeeze = x.dim() == 2
    if squeeze:
        x = x[..., None]
    length = x.shape[-1]
    d, w = weight.shape
    state = conv_state if conv_state_indices is None else conv_state[conv_state_indices]
    state_len = state.shape[-1]
    if state_len < w - 1:
        raise ValueError(f"conv_state holds {state_len} inputs; width {w} needs >= {w - 1}")
    cd = compute_dtype(x, weight)
    full = torch.cat([state.to(cd), x.to(cd)], dim=-1)  # [b, d, state_len + seqlen]
    new_state = full[..., -state_len:].to(conv_state.dtype)
    if conv_state_indices is None:
        conv_state.copy_(new_state)
    else:
        conv_state[conv_state_indices] = new_state
    out = F.conv1d(full[..., -(length + w - 1):], weight.to(cd)[:, None, :],
                   None if bias is None else bias.to(cd), groups=d)
    out = activate(out, activation).to(x.dtype)
    return out[..., 0] if squeeze else out
