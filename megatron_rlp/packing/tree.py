"""Branch-packed sequences: a document window once, then (position, thought) branches.

The unpacked update runs every (context k, thought g) as its own sequence `prefix_k <think>
thought_kg`, so a document's prefix is recomputed with gradients ppd x G times. A packed
sequence holds the window `doc[ws : t_max]` once and then branches `<think> thought_kg[:-1]`;
a tree attention mask lets window token c see window tokens [start, c] (causal) and a branch
token see window columns [s_k, e_k) (its own prefix) plus the earlier tokens of its own
branch. Position ids of a branch continue from its prefix end e_k, so every query sees the
keys at the relative positions (RoPE) it sees unpacked: logits, loss and every gradient are
those of the unpacked rows up to floating-point summation order. Gradients reach the
window's tokens from all branches that read them, as the sum of the unpacked prefix copies'.

Layout (one packed sequence, S columns, right-padded):

    [ w_0 ... w_{Lw-1} | <think> c_00 .. | <think> c_01 .. | ... | pad ]
      branch = -1        branch = 0        branch = 1              -2

Per token: `branch` (-1 window, >= 0 branch id within the sequence, -2 padding) and the
window columns [lo, hi) it may read (causal part for window tokens). `tree_mask` turns these
O(S) descriptors into Megatron's [B, 1, S, S] bool mask (True = masked) when a micro-batch
runs, so the O(S^2) mask is never stored for the whole batch.

Why not Megatron's `PackedSeqParams`: THD packing separates sequences (block-diagonal); a
branch must read another segment (its prefix), which needs a tree mask. Megatron's local
`DotProductAttention` takes an arbitrary [B, 1, S, S] mask (its torch softmax path applies
it; `models.provider` keeps the fused kernel off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlp.models.masks import PAD, WINDOW
from megatron_rlp.rollout.template import lead_ids
from megatron_rlp.utils import ceil_to


@dataclass
class PackPlan:
    """Which rows (thoughts) go into which packed sequence.

    Attributes:
        seq_doc: [N] long, window row (document) of each packed sequence.
        seq_rows: [N, K] long, the K thought rows of each sequence (row = context*G + g), in
            the order their losses are averaged; all sequences hold K rows.
    """

    seq_doc: Tensor
    seq_rows: Tensor


def plan_packing(context_doc: Tensor, group_size: int, rows_per_seq: int) -> PackPlan | None:
    """Cut the rows of each document into packed sequences of `rows_per_seq` rows.

    Args:
        context_doc: [B] long, window row of each context; a document's contexts consecutive.
        group_size: G; row r belongs to context r // G.
        rows_per_seq: thoughts per packed sequence (the rows of one document or a divisor).

    Returns:
        The plan, or None when a document's rows are not a multiple of `rows_per_seq` (the
        caller keeps the unpacked layout).
    """
    row_doc = context_doc.repeat_interleave(group_size)
    docs, counts = torch.unique_consecutive(row_doc, return_counts=True)
    if bool((counts % rows_per_seq != 0).any()):
        return None
    rows = torch.arange(len(row_doc), device=row_doc.device).view(-1, rows_per_seq)
    return PackPlan(seq_doc=row_doc[rows[:, 0]], seq_rows=rows)


def pack_branches(plan: PackPlan, window_tokens: Tensor, window_valid: Tensor,
                  prefix_start: Tensor, prefix_end: Tensor, group_size: int, think_start: int,
                  thought_tokens: Tensor, thought_lengths: Tensor, pad: int,
                  width: int | None = None, multiple: int = 1) -> dict[str, Tensor]:
    """Build the packed sequences of `plan`.

    Args:
        window_tokens, window_valid: [D, W] left-padded document windows.
        prefix_start, prefix_end: [B] long, the columns [start, end) of context b's prefix in
            its (left-padded) window row. The window tokens themselves are computed once,
            causally from the window's first column, so exactness needs every context of a
            document to start there (what `data.batches.build_rlp_inputs` produces); a later
            start only narrows what the branch reads.
        think_start: the `<think>` id, or a template's lead ids ending with it
            (`rollout.template`): each branch is `lead thought[:-1]`, no loss on the lead.
        thought_tokens: [R, L] sampled thoughts (R = B*G), `thought_lengths`: [R] (>= 1).
        width: pad every sequence to this length (pipeline parallel: one shape for all), else
            to the longest; rounded up to a multiple of `multiple` (sequence parallel).

    Returns:
        dict with tokens, positions, branch, lo, hi: [N, S] long; index: [N, K*L] long, the
        position whose logits predict thought token l of the sequence's k-th row (0 where
        l >= its length); rows: [N, K] long (the plan's rows).
    """
    n_seq, k = plan.seq_rows.shape
    length = thought_tokens.shape[1]
    lead = torch.tensor(lead_ids(think_start), dtype=torch.long, device="cpu")  # host-built
    m = len(lead)
    ctx = plan.seq_rows // group_size  # [N, K] context of each row
    lens = thought_lengths[plan.seq_rows]  # [N, K]
    # A window holds its document's columns up to the longest prefix end among its rows.
    win_first = (~window_valid).sum(1)[plan.seq_doc]  # [N] first valid column (left padding)
    win_end = prefix_end[ctx].max(1).values  # [N]
    win_len = win_end - win_first
    need = win_len + (lens + m - 1).sum(1)
    s = int(need.max()) if width is None else width
    s = ceil_to(s, multiple)
    if int(need.max()) > s:
        raise ValueError(f"packed sequences need {int(need.max())} columns, width is {s}")

    host = dict(dtype=torch.long, device="cpu")  # built on the host, moved by the caller
    tokens = torch.full((n_seq, s), pad, **host)
    positions = torch.zeros(n_seq, s, **host)
    branch = torch.full((n_seq, s), PAD, **host)
    lo = torch.zeros(n_seq, s, **host)
    hi = torch.zeros(n_seq, s, **host)
    index = torch.zeros(n_seq, k * length, **host)
    steps = torch.arange(length + m - 1, **host)
    for i in range(n_seq):
        d, first, wl = int(plan.seq_doc[i]), int(win_first[i]), int(win_len[i])
        tokens[i, :wl] = window_tokens[d, first:first + wl]
        positions[i, :wl] = torch.arange(wl, **host)
        branch[i, :wl] = WINDOW
        hi[i, :wl] = torch.arange(1, wl + 1, **host)  # causal over the window
        at = wl
        for j in range(k):
            row, c, n = int(plan.seq_rows[i, j]), int(ctx[i, j]), int(lens[i, j])
            start, end = int(prefix_start[c]) - first, int(prefix_end[c]) - first
            b = n + m - 1  # the branch: lead, then the thought up to its last token
            tokens[i, at:at + m] = lead
            tokens[i, at + m:at + b] = thought_tokens[row, :n - 1]
            positions[i, at:at + b] = end + steps[:b]  # continue from the prefix end
            branch[i, at:at + b] = j
            lo[i, at:at + b], hi[i, at:at + b] = start, end
            index[i, j * length:j * length + n] = at + m - 1 + steps[:n]
            at += b
    return dict(tokens=tokens, positions=positions, branch=branch, lo=lo, hi=hi, index=index,
                rows=plan.seq_rows)


def tree_mask(branch: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Megatron attention mask of packed sequences: [B, S] descriptors -> [B, 1, S, S] bool,
    True = masked.

    Query i reads key j iff j is a window token with lo[i] <= j < hi[i], or i and j are in
    the same branch and j <= i. Padding queries read nothing (Megatron fills masked scores
    with -10000, not -inf, so their softmax stays finite; their outputs are never used).
    """
    s = branch.shape[1]
    j = torch.arange(s, device=branch.device)
    window_key = (branch == WINDOW)[:, None, :]
    sees_window = window_key & (j >= lo[:, :, None]) & (j < hi[:, :, None])
    same_branch = ((branch[:, :, None] == branch[:, None, :]) & (branch >= 0)[:, :, None]
                   & (j[None, None, :] <= j[None, :, None]))
    return ~(sees_window | same_branch)[:, None]
