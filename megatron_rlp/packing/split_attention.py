"""Tree attention of the branch-packed update computed by its structure: the window causally,
every branch against its prefix's keys and its own (`model.packed_attention=split`).

The packed sequence `window | <think> thought_0 | <think> thought_1 | ...` (`packing.tree`)
attends along a tree: a window token reads the window causally, a branch token reads its
prefix (window columns [lo, hi)) and the earlier tokens of its own branch. Megatron's
`DotProductAttention` computes it densely from the [B, 1, S, S] tree mask: every (query, key)
score of S x S, the masked ones filled with -10000, two [B*np, S, S] batched matmuls, an S x S
softmax and their backward. With G branches of T tokens after a W-token window, S = W + G*T
and most pairs are masked (at 25M, G=16, W=160, T=32: 78% of them); on a CPU thread that
dense attention was ~40% of the update. This module computes only the pairs the tree reads:

    window   [W, W]             causal SDPA (`F.scaled_dot_product_attention(is_causal=True)`)
    branches [G*T, W] + [T, T]  per sequence and KV group, all branch queries of the group's
                                heads against the window keys as one GEMM, each branch's
                                queries against its own keys (batched), one softmax over
                                the concatenated W + T scores (masked to [lo, hi) and causal),
                                then the two value products summed

and puts the outputs back in packed order. Same scores, same softmax (fp32), same weighted
sums as the dense path, summed in another order: loss and gradients equal it within fp32
rounding (tests/unit/test_split_attention.py). Padding queries (their outputs are never read)
get some row's output instead of Megatron's uniform average; masked keys get exactly zero
probability (-inf, not -10000), so no gradient reaches them.

Wiring: the packed forward keeps passing Megatron's boolean tree mask (Mamba layers, the
fallback and activation recomputation read it as before) and registers this module's
`SplitLayout` for it, keyed by the mask's storage as `models.mamba.branches` does; the core
attention (Megatron's local or TE's; core attention has no weights) is wrapped
(`route_core_attention`) to take the split path for a registered mask and call the original
otherwise, and for what the split path does not do (attention dropout in training,
`apply_query_key_layer_scaling`, other softmax types, sliding windows: `packing.flex`'s
list), where Megatron's dense path applies the same tree mask.

Written here because neither Megatron-Core nor PyTorch has a tree-structured attention on
CPU: Megatron's packed sequences are block-diagonal (THD), and FlexAttention's block-sparse
kernel is compiled for CUDA (its CPU eager operator is dense math, `packing.flex`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_rlp.models.masked_attention import wrap_core_attentions
from megatron_rlp.models.masks import WINDOW
from megatron_rlp.packing.flex import check_supported


@dataclass
class SplitLayout:
    """Where the window and the branches of a packed micro-batch ([N, S]) lie.

    Attributes:
        window: W, the longest window: columns [0, W) are computed causally (a shorter
            window's row reads only its own columns; the rest of its W outputs are dropped).
        branches: K, branch slots per sequence; length: T, token slots per branch.
        cols: [N, K*T] long, the packed column of each slot (clamped where the slot is empty).
        masked: [N, 1, 1, K, T, W+T] bool, True = masked: the slot's scores against the
            window columns (its prefix [lo, hi)) and against its own branch (causal, real
            tokens; slot 0 stays readable so that no row is fully masked).
        out: [N, S] long, each column's output in concat(window outputs [W], slots [K*T]).
        rows: [S*N] long, `out` as rows of the flattened [N * (W + K*T)] outputs, in
            Megatron's [S, N] token order.
    """

    window: int
    branches: int
    length: int
    cols: Tensor
    masked: Tensor
    out: Tensor
    rows: Tensor

    @classmethod
    def from_packed(cls, branch: Tensor, lo: Tensor, hi: Tensor) -> SplitLayout:
        """From `packing.tree.pack_branches`' descriptors branch, lo, hi ([N, S] long).

        Raises:
            ValueError: the layout is not a packed tree: the window must be the columns
                [0, Lw) read causally from column 0, each branch contiguous with one prefix
                [lo, hi) inside its window, and at least one branch.
        """
        n, s = branch.shape
        dev = branch.device
        col = torch.arange(s, device=dev).expand(n, s)
        is_win = branch == WINDOW
        win_len = is_win.sum(1)
        k = int(branch.max()) + 1
        if (k < 1 or not torch.equal(is_win, col < win_len[:, None])
                or bool((lo[is_win] != 0).any()) or bool((hi[is_win] != col[is_win] + 1).any())):
            raise ValueError("split attention needs packed sequences: the window causal from "
                             "column 0, then branches")
        member = branch[:, :, None] == torch.arange(k, device=dev)  # [N, S, K]
        size = member.sum(1)  # [N, K]
        start = member.int().argmax(1)  # first column of each branch (0 if absent)
        t = int(size.max())
        steps = torch.arange(t, device=dev)
        cols = (start[..., None] + steps).clamp(max=s - 1)  # [N, K, T]
        valid = steps < size[..., None]
        flat = cols.reshape(n, k * t)
        b_lo, b_hi = lo.gather(1, start), hi.gather(1, start)  # [N, K]
        ids = torch.arange(k, device=dev)[:, None].expand(k, t)
        same = ((branch.gather(1, flat).view(n, k, t) == ids)
                & (lo.gather(1, flat).view(n, k, t) == b_lo[..., None])
                & (hi.gather(1, flat).view(n, k, t) == b_hi[..., None]))
        if not bool(same[valid].all()) or bool(((b_hi > win_len[:, None]) & (size > 0)).any()):
            raise ValueError("split attention needs contiguous branches, each with one prefix "
                             "[lo, hi) inside its window")
        w = int(win_len.max())
        key = torch.arange(w, device=dev)
        sees_prefix = (key >= b_lo[..., None]) & (key < b_hi[..., None])  # [N, K, W]
        own = (steps[None, :] <= steps[:, None]) & (valid[:, :, None, :] | (steps == 0))
        sees = torch.cat([sees_prefix[:, :, None, :].expand(n, k, t, w), own], -1)
        out = torch.where(is_win, col, 0)  # padding columns: any output (never read)
        seq = torch.arange(n, device=dev)[:, None, None].expand(n, k, t)
        slot = w + torch.arange(k * t, device=dev).view(1, k, t).expand(n, k, t)
        out[seq[valid], cols[valid]] = slot[valid]
        rows = (out + (w + k * t) * torch.arange(n, device=dev)[:, None]).t().reshape(-1)
        return cls(window=w, branches=k, length=t, cols=flat, masked=~sees[:, None, None],
                   out=out, rows=rows)


_LAYOUTS: dict[tuple, SplitLayout] = {}  # by the tree mask's storage (see register_layout)


def _key(mask: Tensor) -> tuple:
    return mask.data_ptr(), tuple(mask.shape), str(mask.device)


def register_layout(mask: Tensor, branch: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Register the `SplitLayout` of packed sequences (branch / lo / hi [N, S]) under their
    [N, 1, S, S] tree mask, for the routed core attentions; returns `mask`. Keyed by the
    mask's storage, as `models.mamba.branches.register_layout`: activation recomputation
    reruns core attention in the backward on a detached copy of the mask, which shares it.
    The entry goes when the mask is freed."""
    key = _key(mask)
    _LAYOUTS[key] = SplitLayout.from_packed(branch, lo, hi)
    weakref.finalize(mask, _LAYOUTS.pop, key, None)
    return mask


def layout_of(mask) -> SplitLayout | None:
    """The layout registered for `mask` (or a view of its storage), else None."""
    if not _LAYOUTS or not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        return None
    return _LAYOUTS.get(_key(mask))


def _slots(x: Tensor, cols: Tensor) -> Tensor:
    """[S, N, h, D] -> [N, h, K*T, D]: the branch slots' rows (one row copy per token)."""
    s, n, h, d = x.shape
    rows = (cols * n + torch.arange(n, device=cols.device)[:, None]).reshape(-1)
    return x.reshape(s * n, h * d).index_select(0, rows).view(n, -1, h, d).transpose(1, 2)


def split_tree_attention(query: Tensor, key: Tensor, value: Tensor, layout: SplitLayout,
                         scale: float) -> Tensor:
    """Tree-masked attention in Megatron's layout, computing only the pairs the tree reads.

    Args:
        query: [S, N, np, hn]; key, value: [S, N, ng, hn] (np a multiple of ng: GQA, head
            i of group i // (np / ng) as in Megatron's `repeat_interleave`).
        layout: the micro-batch's `SplitLayout`.
        scale: softmax scale applied to q.k (Megatron's `softmax_scale`).

    Returns:
        [S, N, np * hn], Megatron's core-attention output (padding columns aside).
    """
    s, n, heads, hn = query.shape
    groups = key.shape[2]
    rep = heads // groups
    w, k, t = layout.window, layout.branches, layout.length
    q, kk, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [N, h, S, hn]
    ow = F.scaled_dot_product_attention(q[:, :, :w], kk[:, :, :w], v[:, :, :w], is_causal=True,
                                        scale=scale, enable_gqa=rep > 1)  # [N, np, W, hn]
    qs = _slots(query, layout.cols).reshape(n, groups, rep * k * t, hn)  # group's heads stacked
    ks = _slots(key, layout.cols).reshape(n, groups, 1, k, t, hn)
    vs = _slots(value, layout.cols).reshape(n, groups, 1, k, t, hn)
    prefix = torch.matmul(qs, kk[:, :, :w].transpose(-1, -2)).view(n, groups, rep, k, t, w)
    own = torch.matmul(qs.view(n, groups, rep, k, t, hn), ks.transpose(-1, -2))
    scores = torch.cat([prefix, own], -1).mul_(scale).masked_fill_(layout.masked, float("-inf"))
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype)  # Megatron: fp32
    p_prefix, p_own = probs.split([w, t], -1)
    ob = torch.matmul(p_prefix.reshape(n, groups, rep * k * t, w), v[:, :, :w])
    ob = ob.view(n, groups, rep, k, t, hn) + torch.matmul(p_own, vs)
    out = torch.cat([ow, ob.view(n, heads, k * t, hn)], 2)  # [N, np, W + K*T, hn]
    out = out.transpose(1, 2).reshape(n * (w + k * t), heads * hn)
    return out.index_select(0, layout.rows).view(s, n, heads * hn)


def _routed_forward(core: torch.nn.Module, original, query, key, value, attention_mask,
                    attn_mask_type=None, attention_bias=None, packed_seq_params=None, **kw):
    layout = layout_of(attention_mask)
    scale = None
    if layout is not None and attention_bias is None and packed_seq_params is None and not kw:
        try:
            scale = check_supported(core, "split")
        except ValueError:  # attention dropout, layer scaling, ...: Megatron's dense path
            scale = None
    if scale is None:
        return original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                        attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                        **kw)
    return split_tree_attention(query, key, value, layout, scale)


def route_core_attention(model) -> int:
    """Let every `core_attention` of `model` (a module or pipeline chunks) compute a tree mask
    with a registered `SplitLayout` by `split_tree_attention`; idempotent, and transparent for
    every other mask. Returns the number of modules routed."""
    return wrap_core_attentions(model, "_rlp_split_original", _routed_forward)
