"""Compiled decode step (`rlp.compile_decode`, packing/compiled.py) against the eager one.

Identical fp32 thoughts, log-probs and S_pred within 1e-5, with cascade decode on and off,
with finished thoughts compacted to bucket sizes; recompiles bounded over a 20-step rollout
(one graph per decode-batch bucket, none on a second rollout); Mamba layers run the eager
step. One-process gloo group, the tiny models of test_cascade_decode, fp32. Inductor
compiles take ~10-30 s per graph on this CPU: one compiled case in the default suite, the
rest `slow`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.tiny_models import tiny_model
from test_cascade_decode import TOK, _assert_equal, _closing_sampler, _inputs

from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.data.contexts import Context
from megatron_rlp.packing import compiled, decode
from megatron_rlp.packing.prefill import SharedWindows
from megatron_rlp.rollout import thoughts as thoughts_module
from megatron_rlp.rollout.thoughts import sample_thoughts_chunked
from megatron_rlp.train.loop import kernel_metrics

G = 3


@pytest.fixture
def dense():  # per test: the hybrid test needs its own parallel state
    with tiny_model(TOK.vocab_size, "dense") as net:
        yield net.eval()


def _narrower_inputs():
    """`_inputs`' documents with other positions: as many contexts, narrower windows (a
    later step's batch)."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (50, 30)]
    contexts = [Context(d, t, docs[d][:t], int(docs[d][t])) for d, t in
                ((0, 12), (0, 25), (1, 9), (1, 17), (1, 21))]
    return build_rlp_inputs(contexts, list(range(5)), SimpleNamespace(documents=docs),
                            max_prefix=32, pad=TOK.pad)


def _rollout(model, compile: bool, cascade: bool = True, inputs=_inputs, **kw):
    prompts, windows = inputs()
    shared = SharedWindows.from_windows(windows, prompts, cascade, compile)
    kw = dict(group_size=G, max_thought_tokens=6, temperature=1.0, top_p=1.0,
              think_start=TOK.think_start, think_end=TOK.think_end, pad=TOK.pad,
              vocab_size=TOK.vocab_size, seed=3, step=1) | kw
    return sample_thoughts_chunked(model, prompts, 0, shared=shared, **kw)


def _batch_sizes(monkeypatch) -> list[int]:
    """Rows of every compiled decode step's batch, recorded."""
    sizes: list[int] = []
    call = compiled.compiled_call

    def record(module, tokens, *args, **kwargs):
        sizes.append(tokens.shape[0])
        return call(module, tokens, *args, **kwargs)

    monkeypatch.setattr(compiled, "compiled_call", record)
    return sizes


def test_bucket_sizes():
    """Powers of two below the fork's rows, the rows themselves above; the kept rows are
    every unfinished one plus finished filler, ascending. Cache lengths: multiples of 64 up
    to 256, then four buckets per octave."""
    assert [compiled.bucket_length(n) for n in (1, 64, 65, 161, 256, 257, 1100, 2049)] == [
        64, 64, 128, 192, 256, 384, 1536, 3072]
    with pytest.raises(ValueError, match="n >= 1"):
        compiled.bucket_length(0)
    assert [compiled.bucket_rows(n, 15) for n in (1, 2, 3, 5, 8, 9, 15)] == [1, 2, 4, 8, 8,
                                                                              15, 15]
    assert compiled.bucket_rows(16, 16) == 16
    with pytest.raises(ValueError, match="1 <= n <= rows"):
        compiled.bucket_rows(0, 4)
    unfinished = torch.tensor([False, True, False, False, True, True, False])
    keep = compiled.bucket_keep(unfinished, 7)
    assert keep.tolist() == [0, 1, 4, 5]  # 3 unfinished -> bucket 4: filler row 0


def test_compiled_draws_the_eager_thoughts(dense):
    """Cascade on (the compiled model forward and sampler), default suite."""
    eager = _rollout(dense, compile=False)
    before = compiled.compile_count()
    got = _rollout(dense, compile=True)
    _assert_equal(got, eager)
    # one graph each: the model step, the sampler, S_pred's log-prob
    assert 0 < compiled.compile_count() - before <= 3
    assert kernel_metrics()["decode_compiles"] == compiled.compile_count()
    assert bool(eager.mask.sum(1).gt(1).any())
    # narrower windows (same cache length bucket): same graphs, no compilation
    before = compiled.compile_count()
    assert _inputs()[1].tokens.shape[1] != _narrower_inputs()[1].tokens.shape[1]
    _assert_equal(_rollout(dense, compile=True, inputs=_narrower_inputs),
                  _rollout(dense, compile=False, inputs=_narrower_inputs))
    assert compiled.compile_count() == before


@pytest.mark.slow
@pytest.mark.parametrize("cascade", [True, False])
def test_compiled_with_bucket_compaction(dense, monkeypatch, cascade):
    """Thoughts 0 and 1 of every context close at tokens 0 and 2 (15 rows, 5 left): the
    compiled engine compacts to the bucket of 8 (5 rows + 3 finished), the eager one to 5;
    same thoughts, both cache layouts."""
    monkeypatch.setattr(thoughts_module, "sample_vocab_parallel",
                        _closing_sampler({0: 0, 1: 2}))
    monkeypatch.setattr(compiled, "compiled_sampler", _closing_sampler({0: 0, 1: 2}))
    kw = dict(check_every=1, compact_below=0.7, cascade=cascade)
    eager = _rollout(dense, compile=False, **kw)
    sizes = _batch_sizes(monkeypatch)
    got = _rollout(dense, compile=True, **kw)
    assert sorted(set(sizes)) == [8, 15]
    _assert_equal(got, eager)


@pytest.mark.slow
def test_recompiles_bounded_over_20_steps(dense, monkeypatch):
    """20 decode steps, compaction at tokens 2 and 10: one graph per batch bucket (15, 8, 4),
    none more on a second rollout."""
    closing = _closing_sampler({0: 0, 1: 2, 2: 10})
    monkeypatch.setattr(thoughts_module, "sample_vocab_parallel", closing)
    monkeypatch.setattr(compiled, "compiled_sampler", closing)
    kw = dict(max_thought_tokens=20, check_every=1, compact_below=0.7)
    prompts, _ = _inputs()
    eager = _rollout(dense, compile=False, **kw)
    sizes = _batch_sizes(monkeypatch)
    before = compiled.compile_count()
    got = _rollout(dense, compile=True, **kw)
    first = compiled.compile_count() - before
    _assert_equal(got, eager)
    assert len(sizes) >= 10 and 0 < first <= len(set(sizes))
    again = _rollout(dense, compile=True, **kw)
    _assert_equal(again, eager)
    assert compiled.compile_count() - before == first
    # narrower windows in the same length bucket, plain cache too: no more graphs
    for cascade in (True, False):
        eager = _rollout(dense, compile=False, cascade=cascade, inputs=_narrower_inputs, **kw)
        counted = compiled.compile_count()
        _rollout(dense, compile=True, cascade=cascade, **kw)  # the plain cache's graphs
        if cascade:
            assert compiled.compile_count() == counted
        counted = compiled.compile_count()
        got = _rollout(dense, compile=True, cascade=cascade, inputs=_narrower_inputs, **kw)
        _assert_equal(got, eager)
        assert compiled.compile_count() == counted


@pytest.mark.parametrize("kind, why", [("hybrid", "Mamba layers"), ("moe", "MoE layers")])
def test_eager_fallback_keeps_the_thoughts(kind, why):
    """Hybrid and MoE models: `compile_decode` warns once and runs the eager step (same
    thoughts)."""
    with tiny_model(TOK.vocab_size, kind) as net:
        net.eval()
        eager = _rollout(net, compile=False)
        with pytest.warns(UserWarning, match="rlp.compile_decode: eager decode step"):
            engine = decode.SharedPrefixEngine(net, 15, 64, compile=True)
        assert not engine.compile
        before = compiled.compile_count()
        with pytest.warns(UserWarning, match=why):
            got = _rollout(net, compile=True)
        _assert_equal(got, eager)
        assert compiled.compile_count() == before
