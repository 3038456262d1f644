"""Contexts -> tensors: the policy's left-padded prompts and the teacher's document windows.

All contexts of one document share one window `doc[ws : t_max]` with ws = max(0, t_min -
max_prefix): context t reads the prefix `doc[ws : t]`, so no context gets less than its full
prefix doc[max(0, t - max_prefix) : t] (the rule of `data.contexts`, issue 11). The teacher
therefore scores every position of a document in one forward over its window, and policy and
teacher condition on exactly the same prefix. The window depends on the document's first
position, so all of a document's contexts must be on one rank (config validation keeps them
together: `RLPRunConfig` refuses a positions_per_document that does not divide the contexts
per data-parallel rank).

The update's unpacked layout lives here too: `update_batch` lays every thought out as its
own right-padded `prefix <think> thought` row, `split_microbatches` and
`trimmed_microbatches` cut the rows into micro-batches (`packing.update` is the packed
layout of the same rows).

The tensors are assembled on the host (they come from numpy documents) and moved to the
run's device in one copy per tensor per step (`device=`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
from torch import Tensor

from megatron_rlp.data.contexts import Context
from megatron_rlp.data.corpus import TokenizedCorpus
from megatron_rlp.rollout.template import lead_ids
from megatron_rlp.rollout.thoughts import PromptBatch, ThoughtBatch
from megatron_rlp.utils import ceil_to


@dataclass
class DocumentWindows:
    """One left-padded row per document; context b is predicted by logits at (rows[b], cols[b]).

    Attributes:
        tokens: [D, W] long, left-padded.
        valid: [D, W] bool.
        rows: [B] long, window row of each context.
        cols: [B] long, column whose next-token logits predict the context's target.
        targets: [B] long.
    """

    tokens: Tensor
    valid: Tensor
    rows: Tensor
    cols: Tensor
    targets: Tensor


def left_pad(seqs: list[np.ndarray], pad: int) -> tuple[Tensor, Tensor]:
    """Token sequences -> ([N, W] long tokens left-padded with `pad`, [N, W] bool valid)."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):] = torch.from_numpy(np.array(s, dtype=np.int64))
        valid[i, width - len(s):] = True
    return tokens, valid


def build_rlp_inputs(contexts: list[Context], context_ids: list[int], corpus: TokenizedCorpus,
                     max_prefix: int, pad: int, device: torch.device | str = "cpu"
                     ) -> tuple[PromptBatch, DocumentWindows]:
    """Tensors for this rank's contexts (grouped by document, as the sampler returns them),
    on `device`.

    Args:
        contexts: B contexts; those of one document consecutive (any order inside).
        context_ids: Their B global ids.
        corpus: Anything with `documents` (the sampler's corpus).
        max_prefix: `rlp.max_prefix_tokens`; a document's window starts max_prefix tokens
            before its first position (module docstring).
        pad: Padding id.

    Returns:
        (PromptBatch of B left-padded prefixes doc[ws:t], [B, P] with P the longest;
        DocumentWindows of the D documents' windows doc[ws:t_max], [D, W]).
    """
    prefixes, windows, rows, cols = [], [], [], []
    for _, group in groupby(contexts, key=lambda c: c.doc_index):
        group = list(group)
        doc = corpus.documents[group[0].doc_index]
        t_max = max(c.position for c in group)
        ws = max(0, min(c.position for c in group) - max_prefix)
        windows.append(doc[ws:t_max])
        for c in group:
            prefixes.append(doc[ws:c.position])
            rows.append(len(windows) - 1)
            cols.append(c.position - ws - 1)  # relative to the unpadded window
    win_tokens, win_valid = left_pad(windows, pad)
    shift = torch.tensor([win_tokens.shape[1] - len(windows[r]) for r in rows])
    targets = torch.tensor([c.target for c in contexts], dtype=torch.long)
    tokens, valid = left_pad(prefixes, pad)
    prompts = PromptBatch(tokens=tokens, valid=valid, lengths=valid.sum(1), targets=targets,
                          context_ids=torch.tensor(context_ids, dtype=torch.long))
    teacher = DocumentWindows(tokens=win_tokens, valid=win_valid, rows=torch.tensor(rows),
                              cols=torch.tensor(cols) + shift, targets=targets)
    return _to(prompts, device), _to(teacher, device)


def _to(batch, device):
    """A copy of a tensor dataclass with every field on `device` (the same object on it)."""
    fields = {k: v.to(device) for k, v in vars(batch).items()}
    if all(fields[k] is v for k, v in vars(batch).items()):
        return batch
    return type(batch)(**fields)


def update_batch(prompts: PromptBatch, thoughts: ThoughtBatch, advantages: Tensor,
                 group_size: int, pad: int, think_start: int | list[int], multiple: int = 1
                 ) -> dict[str, Tensor]:
    """Right-padded `prefix <think> thought` sequences for the gradient forward; the width is
    a multiple of `multiple` (the TP size under sequence parallel). `think_start` may be a
    template's lead (`rollout.template`: forced ids ending with `<think>`, no loss on them).

    Returns a dict of (on the device of `advantages`; laid out on the host, one copy each):
        tokens, positions: [R, S]; index: [R, L] positions whose logits predict thought token
        k; labels, mask, logp_old: [R, L]; advantages: [R].
    """
    device = advantages.device
    prompts = PromptBatch(**{k: v.cpu() for k, v in vars(prompts).items()})
    thoughts = ThoughtBatch(**{k: v.cpu() for k, v in vars(thoughts).items()})
    lead = torch.tensor(lead_ids(think_start), dtype=torch.long)
    m = len(lead)
    lengths = prompts.lengths.repeat_interleave(group_size)  # [R]
    rows, n = thoughts.tokens.shape
    width = int((lengths + m + thoughts.lengths).max())
    width = ceil_to(width, multiple)
    tokens = torch.full((rows, width), pad, dtype=torch.long)
    prefixes = prompts.tokens.repeat_interleave(group_size, 0)
    for r in range(rows):
        p = int(lengths[r])
        tokens[r, :p] = prefixes[r, -p:]
        tokens[r, p:p + m] = lead
        tokens[r, p + m:p + m + int(thoughts.lengths[r])] = thoughts.tokens[r, :thoughts.lengths[r]]
    k = torch.arange(n)[None]
    index = torch.where(thoughts.mask, lengths[:, None] + (m - 1) + k, 0)
    batch = dict(tokens=tokens, positions=torch.arange(width).expand(rows, -1), index=index,
                 labels=torch.where(thoughts.mask, thoughts.tokens, 0), mask=thoughts.mask,
                 logp_old=thoughts.logprobs)
    return {**{k: v.to(device) for k, v in batch.items()}, "advantages": advantages}


def split_microbatches(batch: dict[str, Tensor], micro_batch_size: int) -> list[dict]:
    """Split every tensor of `batch` along dim 0 into equal micro-batches (0 = one batch)."""
    n = next(iter(batch.values())).shape[0]
    size = micro_batch_size or n
    if n % size:
        raise ValueError(f"train.micro_batch_size={size} must divide the {n} local sequences")
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def trimmed_microbatches(batch: dict[str, Tensor], micro_batch_size: int, multiple: int = 1
                         ) -> list[dict[str, Tensor]]:
    """Micro-batches of sequences of similar length, each cut to its own longest sequence.

    The update batch is padded to the longest sequence of the step; with small micro-batches
    (the paper's recipes use one sequence) most of that padding is wasted compute. Without
    pipeline parallelism nothing needs equal micro-batch shapes, so rows are sorted by length
    and each micro-batch keeps the columns its logits need (right padding never changes a
    causal forward). Rows keep their tensors together, so the loss is unchanged: it is a mean
    over thoughts.
    """
    need = batch["index"].max(1).values + 1  # [R] inputs up to the last scored position
    if 0 < micro_batch_size < len(need):  # one micro-batch: keep the rows' order
        batch = {k: v[torch.argsort(need, stable=True)] for k, v in batch.items()}
    mbs = split_microbatches(batch, micro_batch_size)
    for mb in mbs:
        width = int(mb["index"].max()) + 1
        width = ceil_to(width, multiple)
        mb["tokens"], mb["positions"] = mb["tokens"][:, :width], mb["positions"][:, :width]
    return mbs
