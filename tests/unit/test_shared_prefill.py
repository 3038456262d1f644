"""Shared-prefix rollouts (packing/prefill.py): one prefill per document window gives the
thoughts, sampling log-probs and S_pred of the per-context prefill, also in chunks that cut a
document's contexts apart, for a dense and a hybrid model (Mamba layers fork the conv/SSM
states at each t_k). One-process gloo group, tiny HybridModels, fp32."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.tiny_models import tiny_model

from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.data.contexts import Context
from megatron_rlp.packing.prefill import SharedWindows
from megatron_rlp.rollout.thoughts import sample_thoughts_chunked
from megatron_rlp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module", params=["dense", "hybrid"])
def model(request):
    with tiny_model(TOK.vocab_size, request.param) as net:
        yield net.eval()


@pytest.mark.parametrize("chunk", [0, 3])
def test_shared_prefill_draws_the_per_context_thoughts(model, chunk):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (50, 30)]
    contexts = [Context(d, t, docs[d][:t], int(docs[d][t])) for d, t in
                ((0, 20), (0, 27), (0, 41), (1, 9), (1, 17))]
    prompts, windows = build_rlp_inputs(contexts, list(range(5)), SimpleNamespace(documents=docs),
                                        max_prefix=32, pad=TOK.pad)
    kw = dict(group_size=3, max_thought_tokens=6, temperature=1.0, top_p=1.0,
              think_start=TOK.think_start, think_end=TOK.think_end, pad=TOK.pad,
              vocab_size=TOK.vocab_size, seed=3, step=1)
    ref = sample_thoughts_chunked(model, prompts, chunk, **kw)
    got = sample_thoughts_chunked(model, prompts, chunk,
                                  shared=SharedWindows.from_windows(windows, prompts), **kw)
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.s_pred, ref.s_pred, atol=1e-5, rtol=1e-5)
    assert bool(ref.mask.sum(1).gt(1).any())  # thoughts longer than one token were compared


@pytest.mark.parametrize("model", ["hybrid"], indirect=True)
def test_mamba_prefixes_must_start_at_the_window(model):
    """A context whose prefix starts inside its window would get the window scan's state at
    t_k, which includes earlier tokens: refused, not silently wrong."""
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 256, size=40).astype(np.int32)]
    contexts = [Context(0, t, docs[0][:t], int(docs[0][t])) for t in (20, 30)]
    prompts, windows = build_rlp_inputs(contexts, [0, 1], SimpleNamespace(documents=docs),
                                        max_prefix=32, pad=TOK.pad)
    shared = SharedWindows.from_windows(windows, prompts)
    shared.lengths = shared.lengths - 1
    with pytest.raises(ValueError, match="start at its window"):
        sample_thoughts_chunked(model, prompts, 0, group_size=2, max_thought_tokens=2,
                                temperature=1.0, top_p=1.0, think_start=TOK.think_start,
                                think_end=TOK.think_end, pad=TOK.pad, vocab_size=TOK.vocab_size,
                                seed=0, step=1, shared=shared)
