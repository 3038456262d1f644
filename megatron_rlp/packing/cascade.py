"""Shared-prefix (cascade) decode attention: each context's prefix K/V is stored once.

After the prefill a rollout forks every context's cache G ways. Copying the prefix into each
of the G branch rows (`models.mamba.inference_state.fork_cached_states`) stores R x (P + T)
keys and values per layer (R = C x G rows, P the prefix columns, T the thought columns) and
every decode step reads each prefix G times. Here the prefix stays one row per context and
each branch row only holds its own thought keys:

    prefix  [P, C, groups, dim]   written by the prefill, read-only while decoding
    thought [T, R, groups, dim]   row r's keys from the fork on (column P + s at slot s)

so the cache holds C x P + R x T entries per layer. A decode step attends to both parts and
merges them exactly by log-sum-exp, as cascade attention does (FlashInfer's cascade
inference; Hydragen): with l_p, l_t the log-sum-exps of the masked scores over the prefix and
the thought keys and o_p, o_t the two softmax-weighted value sums,

    out = exp(l_p - l) * o_p + exp(l_t - l) * o_t,    l = logaddexp(l_p, l_t),

which is softmax over the concatenated scores times the concatenated values. The prefix
part runs per context: the queries of a context's live rows are laid out [C, G_max, ...]
and multiply the context's prefix once (one read of it per step, not G).

Written here because Megatron-Core's inference attention has no shared-prefix layout (its
dynamic context's prefix caching shares blocks only through flash-attn paged kernels, which
do not run on CPU). Mamba layers fork their small conv/SSM states as before. Keys are
stored rotated (RoPE by cache slot, `packing.decode`), so no position bookkeeping is needed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from megatron_rlp.models.mamba.inference_state import MambaState


class CascadeKV(NamedTuple):
    """One attention layer's cache after a cascade fork (keys rotated)."""

    prefix_k: Tensor  # [P, C, groups, dim]
    prefix_v: Tensor  # [P, C, groups, dim]
    k: Tensor  # [T, R, groups, dim]: row r's key at cache column P + s is k[s, r]
    v: Tensor  # [T, R, groups, dim]


class CascadeRows:
    """Which context each decoded row belongs to, and its slot among that context's rows.

    Args:
        row_context: [R] long, the context (prefix row) of each decoded row.
        prefix_masked: [C, P] bool, True where a context's prefix column is padding.
    """

    def __init__(self, row_context: Tensor, prefix_masked: Tensor):
        self.row_context = row_context
        self.prefix_masked = prefix_masked
        self.prefix_len = prefix_masked.shape[1]
        contexts = prefix_masked.shape[0]
        counts = torch.bincount(row_context, minlength=contexts)
        first = torch.cumsum(counts, 0) - counts
        # Rows of one context are contiguous (context-major, order kept by `keep`).
        self.slot = torch.arange(len(row_context), device=row_context.device) - first[row_context]
        self.width = int(counts.max()) if len(row_context) else 0  # G_max: one host read


def cascade_fork(ctx, n: int, key_valid: Tensor) -> CascadeRows:
    """Fork every cached row n ways (row b -> rows b*n .. b*n+n-1): attention layers keep
    their first `ctx.sequence_len_offset` columns once per context (the prefill's cache
    itself when it holds exactly those, else a copy of them) and get empty thought caches
    for the other `ctx.max_sequence_length - P` columns; Mamba states are repeated as
    `fork_cached_states` does.

    Args:
        ctx: a `StaticInferenceContext` after the prefill (rotated keys).
        key_valid: [C, >= P] bool, the contexts' attendable columns.

    Returns:
        The rows' `CascadeRows`.
    """
    p = ctx.sequence_len_offset
    contexts = key_valid.shape[0]
    index = torch.arange(contexts, device=key_valid.device).repeat_interleave(n)
    for layer, entry in list(ctx.key_value_memory_dict.items()):
        if isinstance(entry, MambaState):
            ctx.key_value_memory_dict[layer] = MambaState(entry.conv[:, index],
                                                          entry.ssm[:, index])
            continue
        k, v = entry  # [>= P, C, groups, dim]
        t = ctx.max_sequence_length - p
        thought = [x.new_zeros(t, contexts * n, *x.shape[2:]) for x in (k, v)]
        prefix = [x if x.shape[0] == p else x[:p].clone() for x in (k, v)]
        ctx.key_value_memory_dict[layer] = CascadeKV(*prefix, *thought)
    return CascadeRows(index, ~key_valid[:, :p])


def cascade_keep(ctx, rows: CascadeRows, keep: Tensor) -> CascadeRows:
    """Keep the decoded rows `keep` (in order; finished thoughts leave). Thought caches and
    Mamba states are index-selected; the prefixes are not copied (a context whose rows all
    left keeps its prefix: compaction never copies the largest part of the cache)."""
    for layer, entry in list(ctx.key_value_memory_dict.items()):
        if isinstance(entry, MambaState):
            ctx.key_value_memory_dict[layer] = MambaState(entry.conv[:, keep], entry.ssm[:, keep])
        else:
            ctx.key_value_memory_dict[layer] = entry._replace(k=entry.k[:, keep],
                                                              v=entry.v[:, keep])
    return CascadeRows(rows.row_context[keep], rows.prefix_masked)


def cascade_attention(query: Tensor, key: Tensor, value: Tensor, entry: CascadeKV,
                      rows: CascadeRows, pos: int, scale: float) -> Tensor:
    """Attention of one decode step over a context's shared prefix and the row's own keys.

    Args:
        query: [R, heads, dim] rotated queries at cache column `pos`.
        key, value: [R, groups, dim] the new (rotated) key and value, written at `pos`.
        entry: the layer's cache (updated in place at slot pos - P).
        rows: row -> context map and the prefixes' padding.
        scale: softmax scale.

    Returns:
        [R, heads * dim] context vectors in the cache's dtype; equal to softmax over all
        P + (pos - P + 1) keys (the -10000 fill of Megatron's torch softmax on padding, fp32
        scores and softmax), up to fp32 summation order.
    """
    r, heads, dim = query.shape
    s = pos - rows.prefix_len
    entry.k[s, :r] = key
    entry.v[s, :r] = value
    q = query.view(r, key.shape[1], heads // key.shape[1], dim)
    out_p, lse_p = prefix_attention(q, entry, rows, scale)
    # Thought: each row's own keys, slots 0..s (all attendable).
    k, v = entry.k[:s + 1, :r], entry.v[:s + 1, :r]
    scores = torch.einsum("rghd,srgd->rghs", q, k).float() * scale
    lse_t = torch.logsumexp(scores, -1, keepdim=True)
    probs = torch.exp(scores - lse_t).to(v.dtype)
    out_t = torch.einsum("rghs,srgd->rghd", probs, v).float()
    return merge_parts(out_p, lse_p, out_t, lse_t).to(v.dtype).reshape(r, heads * dim)


def prefix_attention(q: Tensor, entry: CascadeKV, rows: CascadeRows,
                     scale: float) -> tuple[Tensor, Tensor]:
    """The prefix half of cascade attention: the queries laid out per context
    ([C, G_max, groups, h, dim]), so each context's prefix keys and values are read once.

    Args:
        q: [R, groups, heads/groups, dim] decode queries.

    Returns:
        out_p [R, groups, heads/groups, dim] fp32 and lse_p [R, groups, heads/groups, 1]: the
        softmax over the unmasked prefix keys (masked ones filled with Megatron's -10000).
    """
    contexts, (_, groups, per_group, dim) = entry.prefix_k.shape[1], q.shape
    padded = q.new_zeros(contexts, rows.width, groups, per_group, dim)
    padded[rows.row_context, rows.slot] = q
    scores = torch.einsum("cjghd,pcgd->cjghp", padded, entry.prefix_k).float() * scale
    scores = scores.masked_fill(rows.prefix_masked[:, None, None, None, :], -10000.0)
    lse_p = torch.logsumexp(scores, -1, keepdim=True)
    probs = torch.exp(scores - lse_p).to(entry.prefix_v.dtype)
    out_p = torch.einsum("cjghp,pcgd->cjghd", probs, entry.prefix_v)
    return (out_p[rows.row_context, rows.slot].float(),
            lse_p[rows.row_context, rows.slot])


def merge_parts(out_p: Tensor, lse_p: Tensor, out_t: Tensor, lse_t: Tensor) -> Tensor:
    """Two softmax-attention parts over disjoint keys merged exactly by log-sum-exp (cascade
    attention's merge): fp32 outputs [..., dim] and their lse [..., 1] -> fp32 [..., dim]."""
    lse = torch.logaddexp(lse_p, lse_t)
    return torch.exp(lse_p - lse) * out_p + torch.exp(lse_t - lse) * out_t


def cache_bytes(ctx) -> int:
    """Bytes of every tensor cached in `ctx.key_value_memory_dict` (K/V or prefix + thought
    parts, Mamba states)."""
    return sum(t.numel() * t.element_size() for entry in ctx.key_value_memory_dict.values()
               for t in entry)
