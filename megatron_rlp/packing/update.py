"""The branch-packed RLP update: micro-batches of packed sequences, forward step and loss.

Same loss as `train.rlp_step`'s unpacked update (clipped surrogate, token-mean per thought,
mean over thoughts) on the same thought rows, computed from one forward per document window
instead of one per thought (`packing.tree`). Each micro-batch holds `micro_batch_size`
thought rows (0 = all), as the unpacked update's do:
- a micro-batch of whole documents packs each document into one sequence;
- a micro-batch smaller than a document packs the document's rows into several sequences,
  each repeating the window (with one row per micro-batch this is the unpacked layout).
Other sizes keep the unpacked update: `packable` says which. Mamba layers (hybrid models)
scan each packed sequence's window once and start every branch from the conv/SSM state at
its t_k (`models.mamba.model_walk.attach_branch_layout`), with gradients into the window.

On CPU the tree mask goes through Megatron's local `DotProductAttention` as an explicit
[B, 1, S, S] mask (Megatron's torch softmax path applies a given mask whatever the layer's
mask type; `models.provider` keeps the fused kernel, which would not, off; TE layers take
boolean masks through `models.masked_attention`). With
`model.packed_attention=flex` (the default on CUDA) the forward passes the tree's O(S)
descriptor instead and `packing.flex` runs core attention as FlexAttention with a BlockMask,
skipping the masked tiles.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from megatron_rlp.models.mamba.model_walk import attach_branch_layout
from megatron_rlp.models.output_positions import logits_at_positions
from megatron_rlp.objective import rlp_policy_loss
from megatron_rlp.objective.kl import kl_penalty
from megatron_rlp.packing.flex import route_core_attention, tree_block_mask, tree_descriptors
from megatron_rlp.packing.rotary import rotary_at_positions
from megatron_rlp.packing.tree import pack_branches, plan_packing, tree_mask
from megatron_rlp.scoring.next_token import token_logprobs_vocab_parallel


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

    `block_sparse` (FlexAttention, `packing.flex`): masked tiles are skipped, so the pairs
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
        block_sparse: the forward runs FlexAttention (`rows_per_sequence`'s cost model).
        routing: [R, L, layers, E] the rollout's routing of the thought tokens (MoE models,
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
            width = -(-used // multiple) * multiple
            for key in ("tokens", "positions", "branch", "lo", "hi"):
                mb[key] = mb[key][:, :width]
    return mbs


def packed_loss(batch: dict[str, Tensor], scale: float, vocab_size: int, temperature: float,
                eps: tuple[float, float], logits: Tensor, *, logp_old_source: str = "update",
                tis_cap: float = 2.0, kl_coef: float = 0.0):
    """The update's loss of a packed micro-batch: `rlp_policy_loss` on its thought rows, exactly
    as the unpacked update (`train.rlp_step._loss`) computes it (KL penalty included).

    `logits`: [m, K*L, V/tp] at `batch["index"]`; reshaped to the [m*K, L] thought rows.
    """
    rows = batch["advantages"].numel()
    logp_new = token_logprobs_vocab_parallel(logits, batch["labels"], vocab_size, temperature)
    loss, metrics = rlp_policy_loss(logp_new.reshape(rows, -1),
                                    batch["logp_old"].reshape(rows, -1),
                                    batch["advantages"].reshape(-1),
                                    batch["mask"].reshape(rows, -1), *eps, logp_old_source,
                                    tis_cap)
    if kl_coef:  # rlp.kl_coef (objective/kl.py)
        kl = kl_penalty(logp_new.reshape(rows, -1), batch["logp_ref"].reshape(rows, -1),
                        batch["mask"].reshape(rows, -1))
        loss, metrics = loss + kl_coef * kl, {**metrics, "kl_ref": kl.detach()}
    return loss * scale, {"loss": loss.detach(), **metrics}


def packed_forward_step(scale: float, vocab_size: int, temperature: float,
                        eps: tuple[float, float], data_iterator, model, *,
                        attention: str = "mask", **loss_options):
    """Megatron `forward_step_func` for packed micro-batches (see `train.update`).

    `attention`: `mask` passes the explicit [B, 1, S, S] tree mask to Megatron's attention;
    `flex` passes the [B, 3, S] tree descriptor, which `packing.flex` routes to FlexAttention
    (block-sparse on CUDA).
    """
    batch = next(data_iterator)
    if attention == "flex":  # attention-only models (config refuses flex with Mamba layers)
        route_core_attention(model)
        mask = tree_descriptors(batch["branch"], batch["lo"], batch["hi"])
        tree_block_mask(mask)  # built once here; every layer (and recompute) reuses it
    else:
        mask = tree_mask(batch["branch"], batch["lo"], batch["hi"])
        attach_branch_layout(model, mask, batch["branch"], batch["lo"], batch["hi"])  # Mamba
    with (logits_at_positions(model, batch["index"]),
          rotary_at_positions(model, batch["positions"])):
        logits = model(batch["tokens"], batch["positions"], mask,
                       padding_mask=batch.get("padding_mask"))  # MoE: models.moe_routing
    return logits, partial(packed_loss, batch, scale, vocab_size, temperature, eps,
                           **loss_options)
