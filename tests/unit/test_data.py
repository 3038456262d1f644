"""Corpus loading, RLP context sampling and next-token batches on small corpora."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_rlp.data import ContextSampler, NTPBatcher, load_corpus
from megatron_rlp.data.contexts import max_window_tokens
from megatron_rlp.tokenizer import ByteTokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "corpus.jsonl"
TOK = ByteTokenizer()


@pytest.fixture
def corpus(tmp_path):
    """Twenty documents of varied length, two of them too short for min_prefix=8."""
    texts = ["tiny", "short!"] + [f"doc {i:02d} " + "abcdefghij" * (1 + i % 3) for i in range(18)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n")
    return load_corpus(path, TOK)


def _key(contexts):
    return [(c.doc_index, c.position, c.target, c.prefix.tolist()) for c in contexts]


def test_shipped_corpus_loads():
    corpus = load_corpus(SHIPPED, TOK)
    assert len(corpus) == 2000
    assert all(doc.dtype == np.int32 for doc in corpus.documents)
    assert 100 <= corpus.lengths.min() and corpus.lengths.max() <= 1500
    assert 1_000_000 < corpus.num_tokens < 3_000_000


def test_shipped_corpus_has_closed_thoughts_in_part_of_it():
    corpus = load_corpus(SHIPPED, TOK)
    lengths, thinking = [], 0
    for doc in corpus.documents:
        starts = np.flatnonzero(doc == TOK.think_start)
        ends = np.flatnonzero(doc == TOK.think_end)
        assert len(starts) == len(ends)
        assert np.all(starts < ends) and np.all(ends[:-1] < starts[1:])  # closed, not nested
        lengths += (ends - starts - 1).tolist()
        thinking += len(starts) > 0
        text = TOK.decode(doc)
        assert "<think" not in text.replace("<think>", "")  # no marker left as bytes
    assert 0.3 < thinking / len(corpus) < 0.7  # the rest of the documents have no thought
    assert 5 < np.mean(lengths) < 40 and max(lengths) <= 64


def test_jsonl_and_txt(tmp_path, corpus):
    assert len(corpus) == 20 and corpus.eos == TOK.eos
    assert TOK.decode(corpus.documents[1]) == "short!"
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\nstill first\n\n  \nsecond é\n\n\n")
    docs = load_corpus(txt, TOK).documents
    assert [TOK.decode(d) for d in docs] == ["first doc\nstill first", "second é"]


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_corpus(tmp_path / "missing.jsonl", TOK)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        load_corpus(bad, TOK)
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*\"text\""):
        load_corpus(bad, TOK)
    bad.write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="no usable document"):
        load_corpus(bad, TOK)


def test_sampler_deterministic_and_order_independent(corpus):
    a = ContextSampler(corpus, min_prefix=8, max_prefix=16, seed=3)
    b = ContextSampler(corpus, min_prefix=8, max_prefix=16, seed=3)
    forward = [_key(a.sample(step, 6, 2)) for step in range(5)]
    backward = [_key(b.sample(step, 6, 2)) for step in reversed(range(5))][::-1]
    assert forward == backward
    assert forward[0] != forward[1]
    other_seed = ContextSampler(corpus, min_prefix=8, max_prefix=16, seed=4)
    assert _key(other_seed.sample(0, 6, 2)) != forward[0]


def test_contexts_match_documents_and_are_grouped(corpus):
    sampler = ContextSampler(corpus, min_prefix=8, max_prefix=16, seed=0)
    for step in range(20):
        contexts = sampler.sample(step, 12, positions_per_doc=3)
        assert len(contexts) == 12
        docs = [c.doc_index for c in contexts]
        assert all(len(set(docs[i : i + 3])) == 1 for i in range(0, 12, 3))
        assert len(set(docs)) == 4  # documents drawn without replacement
        for group in range(0, 12, 3):
            positions = [c.position for c in contexts[group : group + 3]]
            assert positions == sorted(set(positions))
        for c in contexts:
            tokens = corpus.documents[c.doc_index]
            assert len(tokens) > 8 and 8 <= c.position < len(tokens)
            assert c.target == tokens[c.position]
            # The document's contexts share one window opening max_prefix before its first
            # position (what build_rlp_inputs feeds): no prefix shorter than its full one.
            ws = max(0, min(d.position for d in contexts if d.doc_index == c.doc_index) - 16)
            assert c.prefix.tolist() == tokens[ws : c.position].tolist()
            assert min(c.position, 16) <= len(c.prefix) <= max_window_tokens(8, 16, 3)


def test_sampler_errors(corpus):
    with pytest.raises(ValueError, match="min_prefix"):
        ContextSampler(corpus, min_prefix=10, max_prefix=5, seed=0)
    with pytest.raises(ValueError, match="no document"):
        ContextSampler(corpus, min_prefix=10_000, max_prefix=10_000, seed=0)
    sampler = ContextSampler(corpus, min_prefix=8, max_prefix=16, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        sampler.sample(0, 5, positions_per_doc=2)
    with pytest.raises(ValueError, match="only 18 exist"):
        sampler.sample(0, 19)


def test_ntp_batcher(corpus):
    batcher = NTPBatcher(corpus, seq_length=32, seed=1)
    batch = batcher.batch(step=7, batch_size=5)
    assert batch.shape == (5, 33) and batch.dtype == np.int64
    assert np.array_equal(batch, NTPBatcher(corpus, seq_length=32, seed=1).batch(7, 5))
    assert not np.array_equal(batch, batcher.batch(8, 5))
    stream = np.concatenate([np.append(doc, TOK.eos) for doc in corpus.documents])
    assert np.array_equal(batcher.stream, stream)
    windows = {tuple(stream[i : i + 33]) for i in range(len(stream) - 32)}
    assert all(tuple(row) in windows for row in batch)
    with pytest.raises(ValueError, match="seq_length"):
        NTPBatcher(corpus, seq_length=len(stream), seed=0)


@pytest.mark.parametrize("strategy, per_doc", [("uniform", 1), ("uniform", 3), ("stride", 3),
                                               ("entropy", 3)])
def test_targets_skip_thought_spans(tmp_path, strategy, per_doc):
    """With the thought markers given, no context targets a marker or a token inside a span
    (so no prefix ends inside a thought); documents whose band has too few other positions
    are replaced by others. Without spans in the corpus the draws are what they were."""
    texts = [f"Q{i}: 12+{i}=? <think>1 plus 2 is 3, then {i}</think> {12 + i}. more text here "
             f"and a bit more {i}" for i in range(30)]
    texts += ["<think>" + "x" * 60 + "</think>"]  # nothing outside the span but markers
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    corpus = load_corpus(path, TOK)
    markers = (TOK.think_start, TOK.think_end)
    score = lambda windows: [w.astype(np.float64)[1:].tolist() + [0.0] for w in windows]  # noqa: E731

    def sampler(skip):
        return ContextSampler(corpus, 4, 40, seed=2, strategy=strategy, stride=2,
                              scorer=score, skip_spans=markers if skip else None)

    unfiltered_hits = 0
    for step in range(1, 30):
        for c in sampler(True).sample(step, 6 * per_doc, per_doc):
            assert not _in_thought(corpus, c), (step, c.doc_index, c.position)
            assert c.doc_index != len(texts) - 1
        unfiltered = sampler(False).sample(step, 6 * per_doc, per_doc)
        unfiltered_hits += sum(_in_thought(corpus, c) for c in unfiltered)
    assert unfiltered_hits > 0  # without the markers spans do get targeted

    spanless = ContextSampler(load_corpus(SHIPPED, TOK), 8, 64, seed=5, strategy=strategy,
                              stride=2, scorer=score, skip_spans=(-1, -2))
    reference = ContextSampler(load_corpus(SHIPPED, TOK), 8, 64, seed=5, strategy=strategy,
                               stride=2, scorer=score)
    assert _key(spanless.sample(3, 4 * per_doc, per_doc)) == _key(
        reference.sample(3, 4 * per_doc, per_doc))


def _in_thought(corpus, c) -> bool:
    """Is the context's target a thought marker or inside a `<think>` span?"""
    doc = corpus.documents[c.doc_index]
    depth = np.cumsum((doc == TOK.think_start).astype(int) - (doc == TOK.think_end).astype(int))
    return c.target in (TOK.think_start, TOK.think_end) or depth[c.position - 1] > 0
