"""Contexts -> tensors: the policy's left-padded prompts and the teacher's document windows.

All contexts of one document share one window `doc[ws : t_max]` with ws = max(0, t_min -
max_prefix): context t reads the prefix `doc[ws : t]`, so no context gets less than its full
prefix doc[max(0, t - max_prefix) : t] (the rule of `data.contexts`, issue 11). The teacher
therefore scores every position of a document in one forward over its window, and policy and
teacher condition on exactly the same prefix. The window depends on the document's first
position, so all of a document's contexts must be on one rank (config validation keeps them
together: `RLPRunConfig` refuses a positions_per_document that does not divide the contexts
per data-parallel rank).

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
from megatron_rlp.rollout.thoughts import PromptBatch


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
