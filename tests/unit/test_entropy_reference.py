"""The `entropy` position strategy against float64 references (one rank; TP=2 in
tests/distributed/vocab_parallel_worker.py).

- `entropy_vocab_parallel`: H(softmax) over the real vocabulary, with Megatron's padded ids
  holding large logits (counting them would move H by far more than the tolerance).
- `window_entropies` / `model_entropy_scorer`: one left-padded forward over windows of
  different lengths equals, position by position, the entropy of a plain full forward of each
  window alone (float64 softmax over the real vocabulary).
- The sampler on the shipped corpus (every document is longer than `max_prefix`, so each
  draws a random band inside it): with the real model as scorer, each document's positions
  are the top-k of the reference entropies within its band (ties to the earlier position).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_rlp.data import ContextSampler
from megatron_rlp.models.provider import unwrap_model
from megatron_rlp.scoring.entropy import (
    entropy_vocab_parallel,
    model_entropy_scorer,
    window_entropies,
)

TINY = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=64",
    "rlp.max_prefix_tokens=32", "rlp.min_prefix_tokens=8", "rlp.max_thought_tokens=4",
    "train.seed=3", "device.num_threads=1", "precision.params_dtype=fp32",
)
MIN_PREFIX, MAX_PREFIX = 8, 24


def reference_entropy(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-sum p log p of softmax(logits[..., :vocab_size]) in float64."""
    logp = torch.log_softmax(logits[..., :vocab_size].double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def full_forward_entropies(model, window: np.ndarray, vocab_size: int) -> np.ndarray:
    """Entropy after window[:j+1] for every j, from one unpadded forward of the window."""
    tokens = torch.from_numpy(np.asarray(window, dtype=np.int64))[None]
    logits = model(tokens, torch.arange(tokens.shape[1])[None], None)[0]
    return reference_entropy(logits, vocab_size).numpy()


def test_entropy_vocab_parallel_equals_float64(state):
    vocab, padded = 250, 320
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, padded, generator=gen) * 4
    logits[..., vocab:] = 6.0  # padded ids: large logits that must not count
    want = reference_entropy(logits, vocab)
    got = entropy_vocab_parallel(logits, vocab)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert (reference_entropy(logits, padded) - want).abs().min() > 1e-3  # the test can tell
    # bf16 logits are promoted before the sums
    torch.testing.assert_close(entropy_vocab_parallel(logits.bfloat16(), vocab).double(),
                               reference_entropy(logits.bfloat16().float(), vocab),
                               rtol=0, atol=1e-4)


def test_window_entropies_equal_full_forwards(state):
    model = unwrap_model(state.policy).eval()
    tok = state.tokenizer
    docs = state.corpus.documents
    windows = [np.asarray(docs[i][:n]) for i, n in zip(range(5), (7, 40, 19, 33, 2), strict=True)]
    got = window_entropies(model, windows, tok.vocab_size, tok.pad)
    assert [len(h) for h in got] == [len(w) for w in windows]
    for w, h in zip(windows, got, strict=True):
        np.testing.assert_allclose(h, full_forward_entropies(model, w, tok.vocab_size),
                                   rtol=0, atol=2e-5)
    padded_h = full_forward_entropies(model, windows[1], 320)
    assert np.abs(padded_h - got[1]).min() > 1e-3  # counting the 59 padded ids would show


def test_model_scorer_equals_reference_and_restores_mode(state):
    model = unwrap_model(state.policy)
    model.train()
    tok = state.tokenizer
    windows = [np.asarray(state.corpus.documents[7][:n]) for n in (12, 30)]
    got = model_entropy_scorer(lambda: model, tok.vocab_size, tok.pad)(windows)
    assert model.training
    model.eval()
    for w, h in zip(windows, got, strict=True):
        np.testing.assert_allclose(h, full_forward_entropies(model, w, tok.vocab_size),
                                   rtol=0, atol=2e-5)


def test_entropy_positions_on_long_documents(state):
    """Every drawn document is longer than max_prefix: positions come from a random band of
    the document, and they are the top-k reference entropies of that band."""
    model = unwrap_model(state.policy).eval()
    tok, corpus, k = state.tokenizer, state.corpus, 3
    seen = []
    scorer = model_entropy_scorer(lambda: model, tok.vocab_size, tok.pad)

    def recording(windows):
        seen.extend(windows)
        return scorer(windows)

    sampler = ContextSampler(corpus, MIN_PREFIX, MAX_PREFIX, seed=5, strategy="entropy",
                             scorer=recording)
    contexts = sampler.sample(4, 8 * k, k)
    assert len(seen) == 8
    decided = 0
    for g, window in enumerate(seen):
        group = contexts[g * k:(g + 1) * k]
        doc = np.asarray(corpus.documents[group[0].doc_index])
        assert len(doc) > 2 * MAX_PREFIX and len(window) == MAX_PREFIX  # a band, not the doc
        starts = [s for s in range(len(doc) - len(window) + 1)
                  if np.array_equal(doc[s:s + len(window)], window)]
        assert len(starts) == 1, "window not found once in its document"
        ws = starts[0]
        h = full_forward_entropies(model, window, tok.vocab_size)
        cands = np.arange(ws + MIN_PREFIX, ws + len(window) + 1)  # t in [lo, hi]
        scores = h[cands - ws - 1]  # h[j] scores the token after window[:j+1]
        order = sorted(range(len(cands)), key=lambda i: (-scores[i], i))
        want = sorted(int(cands[i]) for i in order[:k])
        if scores[order[k - 1]] - scores[order[k]] < 1e-4:
            continue  # a near-tie within fp32 noise: either choice is right
        decided += 1
        assert [c.position for c in group] == want
        for c in group:
            assert c.target == doc[c.position]
            assert np.array_equal(c.prefix, doc[max(0, want[0] - MAX_PREFIX):c.position])
    assert decided >= 6
