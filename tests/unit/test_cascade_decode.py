"""Cascade decode attention (packing/cascade.py): each context's prefix K/V stored once, its
G branch rows attend to it plus their own thought keys, merged by log-sum-exp.

Against the plain paths (the per-context prefill, and the shared prefill with the prefix
copied to every row): identical fp32 thoughts, log-probs and S_pred within 1e-5, dense and
hybrid, with finished thoughts compacted out of the cache (`keep`). The
cache's bytes after the fork are counted: C x P + R x T entries per attention layer.
One-process gloo group, tiny HybridModels, fp32."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.tiny_models import tiny_model

from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.data.contexts import Context
from megatron_rlp.models.mamba.inference_state import MambaState
from megatron_rlp.packing import decode
from megatron_rlp.packing.cascade import CascadeKV, cache_bytes
from megatron_rlp.packing.prefill import SharedWindows, prefill_shared
from megatron_rlp.rollout import thoughts as thoughts_module
from megatron_rlp.rollout.engine import KVCacheEngine
from megatron_rlp.rollout.sampling import token_logprobs
from megatron_rlp.rollout.thoughts import sample_thoughts_chunked
from megatron_rlp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
G = 3


@pytest.fixture(scope="module", params=["dense", "hybrid"])
def model(request):
    with tiny_model(TOK.vocab_size, request.param) as net:
        yield net.eval()


def _inputs():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (50, 30)]
    contexts = [Context(d, t, docs[d][:t], int(docs[d][t])) for d, t in
                ((0, 20), (0, 27), (0, 41), (1, 9), (1, 17))]
    prompts, windows = build_rlp_inputs(contexts, list(range(5)),
                                        SimpleNamespace(documents=docs), max_prefix=32,
                                        pad=TOK.pad)
    return prompts, windows


def _closing_sampler(close_at: dict[int, int]):
    """Thought g emits `</think>` at token close_at[g] (others never close): finished rows,
    hence compaction, at known steps. Tokens otherwise the argmax; log-probs real."""

    def sample(logits, keys, temperature, top_p, vocab_size):
        tok = logits[:, :vocab_size].argmax(-1)
        force = torch.tensor([close_at.get(int(g), -1) == int(k) for g, k in keys[:, 3:5]])
        tok = torch.where(force, TOK.think_end, tok)
        tok = torch.where(~force & (tok == TOK.think_end), 0, tok)
        return tok, token_logprobs(logits[:, :vocab_size], tok, temperature)

    return sample


def _three_paths(model, monkeypatch, chunk: int, **kw):
    prompts, windows = _inputs()
    shared = SharedWindows.from_windows(windows, prompts)
    kw = dict(group_size=G, max_thought_tokens=6, temperature=1.0, top_p=1.0,
              think_start=TOK.think_start, think_end=TOK.think_end, pad=TOK.pad,
              vocab_size=TOK.vocab_size, seed=3, step=1, **kw)
    per_context = sample_thoughts_chunked(model, prompts, chunk, **kw)
    # The shared prefill with the prefix copied to every branch row (no cascade).
    plain_shared = SharedWindows.from_windows(windows, prompts, cascade=False)
    plain = sample_thoughts_chunked(model, prompts, chunk, shared=plain_shared, **kw)
    cascade = sample_thoughts_chunked(model, prompts, chunk, shared=shared, **kw)
    return per_context, plain, cascade


def _assert_equal(got, want):
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
    assert torch.equal(got.closed, want.closed)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.s_pred, want.s_pred, atol=1e-5, rtol=0)


def test_cascade_draws_the_plain_thoughts(model, monkeypatch):
    """(Chunked rollouts run the cascade too: tests/unit/test_shared_prefill.py.)"""
    per_context, plain, cascade = _three_paths(model, monkeypatch, 0)
    _assert_equal(cascade, plain)
    _assert_equal(cascade, per_context)
    assert bool(plain.mask.sum(1).gt(1).any())


def test_cascade_with_compaction(model, monkeypatch):
    """Thoughts 0 and 1 of every context close at tokens 0 and 2: the cache drops them
    (`keep`, twice), the prefixes stay, and nothing changes."""
    monkeypatch.setattr(thoughts_module, "sample_vocab_parallel",
                        _closing_sampler({0: 0, 1: 2}))
    kept, cascade_kept = [], []
    keep, ckeep = KVCacheEngine.keep, decode.cascade_keep
    monkeypatch.setattr(KVCacheEngine, "keep",
                        lambda self, rows: (kept.append(len(rows)), keep(self, rows))[1])
    monkeypatch.setattr(decode, "cascade_keep", lambda ctx, r, rows: (
        cascade_kept.append(len(rows)), ckeep(ctx, r, rows))[1])
    per_context, plain, cascade = _three_paths(model, monkeypatch, 0, check_every=1,
                                               compact_below=0.7)
    assert kept == [10, 5] * 2 and cascade_kept == [10, 5]  # 15 rows -> 10 -> 5, each path
    assert cascade.closed.view(-1, G)[:, :2].all() and not cascade.closed.view(-1, G)[:, 2].any()
    _assert_equal(cascade, plain)
    _assert_equal(cascade, per_context)


def test_cascade_cache_holds_each_prefix_once(model):
    """After the fork: attention layers hold C x P prefix + R x T thought entries (K and V),
    the plain fork R x (P + T); Mamba states are R rows either way."""
    prompts, windows = _inputs()
    shared = SharedWindows.from_windows(windows, prompts)
    contexts, n = len(prompts.lengths), 6
    rows, width = contexts * G, windows.tokens.shape[1]
    p, t = width + 1, n + 1  # window + `<think>`; thought tokens + `</think>`
    cfg = model.config
    per_entry = cfg.num_query_groups * (cfg.hidden_size // cfg.num_attention_heads) * 4
    sizes = {}
    for cascade in (True, False):
        engine = decode.SharedPrefixEngine(model, max_batch_size=rows,
                                           max_sequence_length=p + t, cascade=cascade)
        prefill_shared(engine, shared, TOK.think_start)
        engine.fork(G)
        cache = engine.ctx.key_value_memory_dict
        attention = [e for e in cache.values() if not isinstance(e, MambaState)]
        mamba = sum(x.numel() * x.element_size() for e in cache.values()
                    if isinstance(e, MambaState) for x in e)
        assert all(isinstance(e, CascadeKV) == cascade for e in attention)
        entries = contexts * p + rows * t if cascade else rows * (p + t)
        assert cache_bytes(engine.ctx) == len(attention) * 2 * entries * per_entry + mamba
        sizes[cascade] = cache_bytes(engine.ctx) - mamba
        if cascade:
            e = attention[0]
            assert e.prefix_k.shape[:2] == (p, contexts) and e.k.shape[:2] == (t, rows)
    assert sizes[True] < sizes[False]
