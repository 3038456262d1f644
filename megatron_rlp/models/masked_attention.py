"""Explicit attention masks under Transformer Engine's core attention.

RLP runs attention with explicit boolean masks (Megatron's convention: True = masked): the
left-padded prompts of rollouts and the teacher's left-padded windows (`models.masks`), the
finished rows and padded keys of decode steps (`rollout.engine`), and the packed update's
tree mask (`packing.tree`). Megatron's local `DotProductAttention` applies such a mask on
its torch softmax path (`models.provider` keeps the fused softmax off, whose causal kernel
would ignore it). Megatron's TE specs, however, build self-attention with
`attn_mask_type=causal` (and `Attention` passes `no_mask` for decode steps), and TE's
`DotProductAttention` applies `attention_mask` only for `padding*`/`arbitrary` mask types: a
mask given with `causal`/`no_mask` is ignored, and padded or tree-masked keys would be read.

`route_explicit_masks(model)` makes each TE core attention compute with torch's
`scaled_dot_product_attention` whenever it is handed a boolean mask, with Megatron's
semantics (masked scores at -10000, so a fully masked padding row gets a uniform softmax
and stays finite), and leaves mask-free calls (the NTP step, mask-free
prefills) on TE's fused kernels. Written here because neither Megatron nor TE offers a
switch that makes a `causal` layer honour an explicit mask; SDPA is PyTorch's own kernel.
Tree descriptors of the flex path (`packing.flex`) are not boolean and pass through.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

MASKED_SCORE = -10000.0  # Megatron's FusedScaleMaskSoftmax fill for masked scores


def sdpa_with_mask(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float,
                   dropout_p: float = 0.0) -> Tensor:
    """Attention in Megatron's core-attention layout with an explicit boolean mask.

    Args:
        query: [sq, b, np, hn]; key, value: [sk, b, ng, hn] (np a multiple of ng: GQA).
        mask: bool, broadcastable to [b, 1, sq, sk]; True = masked (Megatron's convention).
        scale: softmax scale applied to q.k; dropout_p: attention dropout (training only).

    Returns:
        [sq, b, np * hn], what Megatron's `DotProductAttention` returns for these inputs.
    """
    sq, b, heads, hn = query.shape
    groups = key.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
    if groups != heads:
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask,
                                                                                 MASKED_SCORE)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                         scale=scale)
    # A fully masked row (a padding query) gets Megatron's uniform softmax: its fill
    # replaces every score, where an additive bias would keep their differences.
    uniform = mask.all(-1, keepdim=True)  # [b|1, 1, sq, 1]
    out = torch.where(uniform, v.mean(-2, keepdim=True), out)
    return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def _is_explicit_mask(mask) -> bool:
    return isinstance(mask, Tensor) and mask.dtype == torch.bool


def _masked_forward(core: torch.nn.Module, original, query, key, value, attention_mask,
                    attn_mask_type=None, attention_bias=None, packed_seq_params=None, **kw):
    if (not _is_explicit_mask(attention_mask) or attention_bias is not None
            or packed_seq_params is not None):
        return original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                        attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                        **kw)
    c = core.config
    scale = c.softmax_scale or 1.0 / math.sqrt(query.shape[-1])
    dropout = c.attention_dropout if core.training else 0.0
    return sdpa_with_mask(query, key, value, attention_mask, scale, dropout)


def wrap_core_attentions(model, tag: str, routed_forward, select=lambda core: True) -> int:
    """Bind `routed_forward(core, original, *args, **kw)` as the forward of every
    `core_attention` of `model` (a module or pipeline chunks) that `select` accepts, once per
    `tag` (idempotent; wrappers of different tags stack). Core attention holds no weights,
    so the specs and checkpoints are unchanged. Returns the number of modules routed."""
    routed = 0
    chunks = model if isinstance(model, (list, torch.nn.ModuleList)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            core = getattr(module, "core_attention", None)
            if not isinstance(core, torch.nn.Module) or not select(core):
                continue
            if tag not in core.__dict__:
                original = core.forward
                core.__dict__[tag] = original
                core.forward = functools.partial(routed_forward, core, original)
            routed += 1
    return routed


def _is_transformer_engine(core: torch.nn.Module) -> bool:
    return type(core).__module__.startswith("megatron.core.extensions.transformer_engine")


def route_explicit_masks(model: torch.nn.Module, only_transformer_engine: bool = True) -> int:
    """Let every core attention of `model` (a module or pipeline chunks) that is TE's
    (`only_transformer_engine`; any core attention otherwise, for tests) compute explicit
    boolean masks with `sdpa_with_mask`; idempotent. Returns the number routed."""
    select = _is_transformer_engine if only_transformer_engine else (lambda core: True)
    return wrap_core_attentions(model, "_rlp_masked_original", _masked_forward, select)
