"""The branch-packed RLP update's layout: micro-batches of packed sequences.

The unpacked update's thought rows (`data.batches.update_batch`), laid out so that one
forward per document window serves them instead of one per thought (`packing.tree`); the
forward step and the loss are the unpacked update's (`train.rlp_update`: clipped surrogate,
token-mean per thought, mean over thoughts; `packing.forward` sets up the tree). Each
micro-batch holds `micro_batch_size` thought rows (0 = all), as the unpacked update's do:
- a micro-batch of whole documents packs each document into one sequence;
- a micro-batch smaller than a document packs the document's rows into several sequences,
  each repeating the window (with one row per micro-batch this is the unpacked layout).
Other sizes keep the unpacked update: `packable` says which. Mamba layers (hybrid models)
scan each packed sequence's window once and start every branch from the conv/SSM state at
its t_k (`models.mamba.model_walk.attach_branch_layout`), with gradients into the window.

With `model.packed_attention=mask` the tree mask goes through Megatron's local
`DotProductAttention` as an explicit
[B, 1, S, S] mask (Megatron's torch softmax path applies a given mask whatever the layer's
mask type; `models.provider` keeps the fused kernel, which would not, off; TE layers take
boolean masks through `models.masked_attention`). With
`model.packed_attention=flex` (the default on CUDA) the forward passes the tree's O(S)
descriptor instead and `packing.flex` runs core attention as FlexAttention with a BlockMask,
skipping the masked tiles; with `split` (the default on CPU) `packing.split_attention`
computes the window and the branches apart, only the pairs the tree reads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rlp.packing.tree import pack_branches, plan_packing
from megatron_rlp.utils import ceil_to


def packable(pattern: str, rows_per_document: int, rows: int, micro_batch_size: int) -> bool:
    """Whether the packed update applies: a micro-batch size that is 0, a multiple of a
    document's rows, or a divisor of them. Every layer pattern packs (`pattern` is kept for
    callers: Mamba layers start branches from their t_k states)."""
    if micro_batch_size == 0:
        return True
    if rows % micro_batch_size:
        return False
    return micro_batch_size % rows_per_document == 0 or rows_per_document % micro_batch_size == 0


def rows_per_sequence(model_cfg, rows: int, limit: int, window: float, thought: float,
                      block_sparse: bool = False) -> int:
    """How many thought branches to pack after one copy of a window: the divisor k of `limit`
    minimising a cost model of the update's forward over rows/k sequences of
    L = window + k * thought tokens: 2 x layer weights per token (the linear layers, and a
    Mamba layer's state update and readout) plus, per (query, key) pair, 4 x heads x
    head_dim per attention layer, tripled for the masked softmax and its memory traffic. All
    branches after one window (k = limit) wastes most of a dense attention on masked
    branch-to-branch blocks once the branches outweigh the window; one branch per sequence
    (k = 1) is the unpacked update.

    `block_sparse` (FlexAttention, `packing.flex`, or the split attention,
    `packing.split_attention`): masked tiles are skipped, so the pairs
    counted are those the tree attends (the window causally, each branch its prefix and
    itself), linear in k: every branch then goes behind one copy of the window (k = limit).
    """
    m = model_cfg
    h, heads = m.hidden_size, m.num_attention_heads
    hd = m.kv_channels or h // heads
    attn_layers, mlp_layers = m.hybrid_layer_pattern.count("*"), m.hybrid_layer_pattern.count("-")
    weights = attn_layers * h * hd * (2 * heads + 2 * m.num_query_groups)
    weights += mlp_layers * (3 if m.activation == "swiglu" else 2) * h * m.ffn_hidden_size
    if "M" in m.hybrid_layer_pattern:  # Mamba: in/out projections + the scan's state work
        heads_m = m.mamba_heads()
        d_inner = heads_m * m.mamba_head_dim
        weights += m.hybrid_layer_pattern.count("M") * (
            h * (2 * d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim + heads_m)
            + d_inner * h + 2 * d_inner * m.mamba_state_dim)
    pair = attn_layers * heads * hd * 4 * 3

    def cost(k: int) -> float:
        length = window + k * thought
        pairs = (window * window / 2 + k * thought * (window + thought / 2) if block_sparse
                 else length * length)
        return rows / k * (2 * weights * length + pair * pairs)

    return min((k for k in range(1, limit + 1) if limit % k == 0), key=cost)


def packed_update_batches(windows, prompts, thoughts, advantages: Tensor, group_size: int,
                          micro_batch_size: int, pad: int, think_start: int,
                          equal_width: bool, multiple: int = 1, model_cfg=None,
                          rows_per_seq: int | None = None,
                          block_sparse: bool = False,
                          routing: Tensor | None = None) -> list[dict[str, Tensor]]:
    """Micro-batches of packed sequences for `optimizer_update`.

    Args:
        windows: `data.batches.DocumentWindows` (tokens, valid [D, W]; rows, cols [B]).
        prompts: `PromptBatch` (lengths [B]); thoughts: `ThoughtBatch` ([R, L] tokens,
            mask, logprobs; [R] lengths); advantages: [R].
        micro_batch_size: thought rows per micro-batch (0 = all); see `packable`.
        equal_width: pad every sequence to one width (pipeline parallel sends one shape);
            otherwise each micro-batch is cut to its own longest sequence.
        model_cfg: `config.ModelConfig`, for `rows_per_sequence` (None: a whole document's
            rows, or the micro-batch's, per sequence).
        rows_per_seq: force the branches per sequence (a divisor of both a document's rows
            and a micro-batch's).
        block_sparse: the forward runs FlexAttention or the split attention
            (`rows_per_sequence`'s cost model).
        routing: [R, L, layers, E / 8] uint8 the rollout's packed routing maps (MoE models,
            `models.moe_routing`); laid out like `mask` as `rollout_routing`.

    Returns:
        Micro-batches with tokens, positions, branch, lo, hi: [m, S]; index, labels, mask,
        logp_old: [m, K*L]; advantages: [m, K].
    """
    rows = thoughts.tokens.shape[0]
    per_doc = rows // len(torch.unique_consecutive(windows.rows)) if rows else 1
    size = micro_batch_size or rows
    limit = min(size, per_doc)  # `packable`: one divides the other
    if rows_per_seq is None:
        rows_per_seq = limit
        if model_cfg is not None:
            rows_per_seq = rows_per_sequence(model_cfg, rows, limit,
                                             float(windows.valid.sum(1).float().mean()),
                                             float(thoughts.lengths.float().mean()),
                                             block_sparse)
    plan = plan_packing(windows.rows.cpu(), group_size, rows_per_seq)
    if plan is None or limit % rows_per_seq:
        raise ValueError(f"micro_batch_size={micro_batch_size} cannot be packed "
                         f"({per_doc} thoughts per document, {rows_per_seq} per sequence)")
    # The layout is built on the host (a loop over small slices), then moved in one go.
    device = thoughts.tokens.device
    end = windows.cols.cpu() + 1  # prefix [start, end) in the left-padded window row
    start = end - prompts.lengths.cpu()
    packed = pack_branches(plan, windows.tokens.cpu(), windows.valid.cpu(), start, end,
                           group_size, think_start, thoughts.tokens.cpu(),
                           thoughts.lengths.cpu(), pad, multiple=multiple)
    r = plan.seq_rows
    n_seq = r.shape[0]
    del packed["rows"]
    packed = {k: v.to(device) for k, v in packed.items()}
    r = r.to(device)
    packed.update(labels=torch.where(thoughts.mask, thoughts.tokens, 0)[r].view(n_seq, -1),
                  mask=thoughts.mask[r].view(n_seq, -1),
                  logp_old=thoughts.logprobs[r].view(n_seq, -1),
                  advantages=advantages.to(device)[r])
    if routing is not None:
        packed["rollout_routing"] = routing.to(device)[r].flatten(1, 2)
    seqs_per_mb = size // rows_per_seq
    mbs = [{k: v[i:i + seqs_per_mb] for k, v in packed.items()}
           for i in range(0, n_seq, seqs_per_mb)]
    if not equal_width:
        for mb in mbs:  # right padding never changes what a query reads
            used = int((mb["branch"] != -2).sum(1).max())
            width = ceil_to(used, multiple)
            for key in ("tokens", "positions", "branch", "lo", "hi"):
                mb[key] = mb[key][:, :width]
    return mbs

