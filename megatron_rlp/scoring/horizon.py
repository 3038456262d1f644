"""The multi-token information-gain reward: `rlp.reward_tokens` (k) and `rlp.reward_discount`.

RLP.md generalises the one-token reward to the next k tokens:

    S_pred(c) = sum_{j<k} gamma^j log p_theta(x_{t+j} | x_<t, <think> c </think>, x_t..x_{t+j-1})
    S_ema     = sum_{j<k} gamma^j log pbar_phi(x_{t+j} | x_<t, x_t..x_{t+j-1})

both cut at the document's end (a context near it scores fewer tokens; the same ones with and
without the thought, so the reward compares like with like). With k = 1 the rollout's own
S_pred and the teacher's `score_next_tokens` give the paper's reward, and this module is not
called (a run with the defaults is unchanged, bit for bit).

Why a separate forward and not the rollout's: the rollout scores x_t from the logits after
`</think>` it already has; k tokens need x_t..x_{t+k-2} fed after the thought, one more
no-gradient forward of the policy over each (prompt, thought) row and one of the teacher over
each raw prefix. Both use `score_next_tokens` (Megatron's vocab-parallel cross-entropy, the
pipeline's last stage broadcasting), on sequences left-padded to a common width; a sequence
longer than the model's window loses its oldest tokens, as the rollout's prompts do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megatron_rlp.data.batches import left_pad
from megatron_rlp.rollout.thoughts import PromptBatch, ThoughtBatch
from megatron_rlp.scoring.next_token import score_next_tokens


def discounted_sum(logps: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """sum_j gamma^j logps[..., j] over the valid tokens.

    Args:
        logps: [..., k] per-token log-probs (any float dtype; float64 stays float64).
        mask: [..., k] bool, False past the document's end.
        gamma: the discount, in (0, 1].

    Returns:
        [...] in the dtype of `logps` promoted to at least fp32.
    """
    dtype = torch.promote_types(logps.dtype, torch.float32)
    weights = gamma ** torch.arange(logps.shape[-1], dtype=torch.float64, device=logps.device)
    return (logps.to(dtype) * weights.to(dtype) * mask).sum(-1)


def horizon_targets(documents: Sequence, positions: Sequence[tuple[int, int]], k: int
                    ) -> tuple[Tensor, Tensor]:
    """The k target tokens of each context and which of them exist.

    Args:
        documents: the corpus's documents (int token arrays).
        positions: (document index, t) per context.

    Returns:
        targets: [C, k] long, doc[t + j] (0 past the end); mask: [C, k] bool.
    """
    targets = torch.zeros(len(positions), k, dtype=torch.long)
    mask = torch.zeros(len(positions), k, dtype=torch.bool)
    for c, (d, t) in enumerate(positions):
        tail = [int(x) for x in documents[d][t:t + k]]
        targets[c, :len(tail)] = torch.tensor(tail, dtype=torch.long)
        mask[c, :len(tail)] = True
    return targets, mask


@torch.no_grad()
def score_horizon(model: torch.nn.Module, sequences: Sequence[Sequence[int]], targets: Tensor,
                  mask: Tensor, gamma: float, *, vocab_size: int, pad: int, window: int
                  ) -> Tensor:
    """Discounted log-likelihood of each row's k targets after its sequence.

    Args:
        model: the policy or the teacher (this rank's stage), in eval mode.
        sequences: N token lists (a prefix, or a prompt with its thought and `</think>`).
        targets, mask: [N, k] from `horizon_targets` (rows repeated per thought).
        gamma: the discount.
        vocab_size: the tokenizer's vocabulary; pad: its pad id; window: the model's
            `max_sequence_length` (longer inputs keep their last `window` tokens).

    Returns:
        [N] fp32 `discounted_sum` of log p(targets[n, j] | sequence, targets[n, :j]), on every
        pipeline stage.
    """
    n, k = targets.shape
    rows_in = []
    for seq, tgt in zip(sequences, targets.tolist(), strict=True):
        rows_in.append((list(seq) + tgt[:k - 1])[-window:])
    tokens, valid = left_pad(rows_in, pad)
    device = next(model.parameters()).device
    width = tokens.shape[1]
    # Target j of row r is predicted at column width - k + j (the last k columns).
    rows = torch.arange(n).repeat_interleave(k)
    cols = (width - k + torch.arange(k)).repeat(n)
    logps = score_next_tokens(model, tokens.to(device), valid.to(device), rows.to(device),
                              cols.to(device), targets.reshape(-1).to(device), vocab_size)
    return discounted_sum(logps.view(n, k), mask.to(device), gamma).float()


def horizon_scores(policy: torch.nn.Module, teacher: torch.nn.Module | None,
                   contexts: Sequence, documents: Sequence, prompts: PromptBatch,
                   thoughts: ThoughtBatch, lead: Sequence[int], think_end: int, k: int,
                   gamma: float, *, vocab_size: int, pad: int, window: int
                   ) -> tuple[Tensor, Tensor | None]:
    """S_pred [C*G] and S_ema [C] over the horizon, for one step's contexts.

    Args:
        policy, teacher: the policy (eval mode) and the EMA teacher; None when the teacher
            does not score this step (`rlp.teacher_scoring`): S_ema is then None.
        contexts: C contexts (`doc_index`, `position`, `prefix`: the raw x_<t the teacher
            reads); documents: the corpus's documents.
        prompts: the policy's C prompts (`rlp.thought_template` applied, left-padded).
        thoughts: the rollout's C*G thoughts, context-major; each row is scored after the
            lead (`<think>`), its tokens and `</think>` (given when the policy did not close
            the thought), as the rollout scored x_t.
        lead: the forced ids before each thought; think_end: the `</think>` id.
    """
    targets, mask = horizon_targets(documents, [(c.doc_index, c.position) for c in contexts], k)
    common = dict(vocab_size=vocab_size, pad=pad, window=window)
    s_ema = None if teacher is None else score_horizon(
        teacher, [[int(x) for x in c.prefix] for c in contexts], targets, mask, gamma, **common)
    group = len(thoughts.tokens) // len(contexts)
    tokens, valid = prompts.tokens.cpu(), prompts.valid.cpu()
    t_tokens, t_mask, closed = thoughts.tokens.cpu(), thoughts.mask.cpu(), thoughts.closed.cpu()
    rows = []
    for row in range(len(t_tokens)):
        c = row // group
        rows.append(tokens[c][valid[c]].tolist() + list(lead) + t_tokens[row][t_mask[row]].tolist()
                    + ([] if bool(closed[row]) else [think_end]))
    s_pred = score_horizon(policy, rows, targets.repeat_interleave(group, 0),
                           mask.repeat_interleave(group, 0), gamma, **common)
    return s_pred, s_ema
