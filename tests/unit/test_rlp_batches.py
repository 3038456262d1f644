"""Contexts -> tensors: prompts and teacher windows agree on every prefix and target."""

from __future__ import annotations

import numpy as np
import torch

from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.data.contexts import Context
from megatron_rlp.data.corpus import TokenizedCorpus

PAD = 999


def corpus() -> TokenizedCorpus:
    docs = [np.arange(100, 160, dtype=np.int32), np.arange(200, 230, dtype=np.int32)]
    return TokenizedCorpus(path="mem", documents=docs, eos=0)


def ctx(c: TokenizedCorpus, d: int, t: int) -> Context:
    doc = c.documents[d]
    return Context(doc_index=d, position=t, prefix=doc[:t], target=int(doc[t]))


def test_windows_and_prompts_share_prefixes():
    c = corpus()
    contexts = [ctx(c, 0, 20), ctx(c, 0, 50), ctx(c, 1, 9)]  # doc 0: two positions, one window
    prompts, win = build_rlp_inputs(contexts, [4, 5, 6], c, max_prefix=40, pad=PAD)
    # doc 0's window starts at max(0, 20 - 40) = 0 for both of its contexts (its first
    # position keeps its full prefix; the later one reads 50 > max_prefix tokens)
    assert prompts.lengths.tolist() == [20, 50, 9]
    assert prompts.context_ids.tolist() == [4, 5, 6]
    assert prompts.targets.tolist() == [120, 150, 209]
    assert win.tokens.shape == (2, 50) and win.rows.tolist() == [0, 0, 1]
    for b, context in enumerate(contexts):
        doc = c.documents[context.doc_index]
        prefix = prompts.tokens[b][prompts.valid[b]]
        ws = context.position - int(prompts.lengths[b])
        assert torch.equal(prefix, torch.as_tensor(doc[ws:context.position], dtype=torch.long))
        r, col = int(win.rows[b]), int(win.cols[b])
        # the teacher's logits at (r, col) see exactly the prompt: same last token, same history
        assert int(win.tokens[r, col]) == int(doc[context.position - 1])
        assert bool(win.valid[r, : col + 1].sum() == prompts.lengths[b])
        assert int(win.targets[b]) == context.target
    assert not bool(prompts.valid[2, :-9].any()) and (prompts.tokens[2, :-9] == PAD).all()
