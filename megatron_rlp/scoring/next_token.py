"""Next-token log-probs from vocab-parallel logits, without gathering the vocabulary.

Used for S_ema (the teacher's no-think score): one forward over each document window, then
log p(x_t | x_<t) at every sampled position via Megatron's `vocab_parallel_cross_entropy`
(which all-reduces max and sum-exp over the tensor-parallel group;
`rollout.vocab_parallel.token_logprobs_vocab_parallel`).

Only the target positions reach the output layer (`models.output_positions`, as in the
update): a window's hidden states are selected before the vocabulary projection, so the
teacher holds [D, contexts per document, V/tp] logits instead of [D, W, V/tp] (at a
2048-token window and Qwen3's 152k vocabulary that is ~1.2 GB of fp32 per document).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.models.output_positions import logits_at_positions
from megatron_rlp.parallel.pipeline import from_last_stage, stage_forward
from megatron_rlp.parallel.sequence import sequence_parallel_off
from megatron_rlp.rollout.vocab_parallel import token_logprobs_vocab_parallel


@torch.no_grad()
def score_next_tokens(model: torch.nn.Module, tokens: Tensor, valid: Tensor, rows: Tensor,
                      cols: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """One forward over left-padded windows; log-prob of `targets[b]` after `(rows[b], cols[b])`.

    Args:
        tokens: [D, W] windows; valid: [D, W]; rows, cols, targets: [B].
        vocab_size: the tokenizer's vocabulary (padded ids are excluded).

    Returns:
        [B] fp32 log-probs (temperature 1), on every pipeline stage.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    slots, index = target_index(rows, cols, tokens.shape[0])
    with sequence_parallel_off(model), logits_at_positions(model, index):
        logits = stage_forward(model, tokens, positions, padded_causal_mask(valid))  # [D,L,V/tp]
    scores = None
    if logits is not None:
        scores = token_logprobs_vocab_parallel(logits[rows, slots], targets, vocab_size)
    return from_last_stage(scores, tuple(targets.shape), torch.float32)


def target_index(rows: Tensor, cols: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Lay the scored positions out per window row for `logits_at_positions`.

    Args:
        rows, cols: [B] long, window row and column of each scored position (any order).
        num_rows: D, the number of windows.

    Returns:
        slots: [B] long, position b's slot within its row (its rank among earlier positions
        of the same row); index: [D, L] long with index[rows[b], slots[b]] = cols[b], L the
        most positions of one row, unused slots 0.
    """
    earlier = torch.ones(len(rows), len(rows), dtype=torch.bool, device=rows.device).tril(-1)
    slots = ((rows[:, None] == rows[None, :]) & earlier).sum(1)
    width = int(slots.max()) + 1 if len(rows) else 1
    index = torch.zeros(num_rows, width, dtype=torch.long, device=rows.device)
    index[rows, slots] = cols
    return slots, index
