"""Synthetic inputs of the packed update tests (tests/unit/test_packed_*.py, tests/kernels):
two documents x 2 positions, G thoughts each of varied lengths, and the loss + gradients of
a list of micro-batches as Megatron's schedule sums them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.data.contexts import Context
from megatron_rlp.rollout.thoughts import ThoughtBatch
from megatron_rlp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
G, L, EPS = 3, 6, (0.2, 0.2)


def _inputs(seed: int = 0):
    """Two documents x 2 positions, G thoughts each; prefixes of different lengths."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (40, 30)]
    contexts = [Context(d, t, docs[d][:t], int(docs[d][t])) for d, t in
                ((0, 20), (0, 33), (1, 9), (1, 17))]
    prompts, windows = build_rlp_inputs(contexts, list(range(4)), SimpleNamespace(documents=docs),
                                        max_prefix=24, pad=TOK.pad)
    rows = len(contexts) * G
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (rows,), generator=gen)
    lengths[0], lengths[1] = 1, L
    mask = torch.arange(L)[None] < lengths[:, None]
    tokens = torch.where(mask, torch.randint(0, 256, (rows, L), generator=gen), TOK.pad)
    logp = torch.where(mask, -torch.rand(rows, L, generator=gen) * 3 - 2.5, 0.0)
    thoughts = ThoughtBatch(tokens=tokens, mask=mask, logprobs=logp, lengths=lengths,
                            closed=torch.ones(rows, dtype=torch.bool),
                            s_pred=torch.zeros(rows))
    advantages = torch.randn(rows, generator=gen)
    return prompts, windows, thoughts, advantages


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, step, mbs, rows):
    """Loss and gradients of `mbs` as Megatron's schedule sums them (loss/num_microbatches)."""
    model.zero_grad(set_to_none=True)
    it, total = iter(mbs), 0.0
    for mb in mbs:
        scale = (mb["advantages"].numel() if "branch" in mb else len(mb["tokens"])) * len(mbs)
        logits, loss_fn = step(scale / rows, TOK.vocab_size, 0.7, EPS, it, model)
        loss, _ = loss_fn(logits)
        (loss / len(mbs)).backward()
        total += float(loss.detach()) / len(mbs)
    return total, _grads(model)
