"""Every context conditions on its full prefix (issue 11).

A document's positions t_1 < ... < t_k share the window doc[ws : t_k], ws = max(0, t_1 -
max_prefix); context t reads doc[ws : t], never less than its full prefix
doc[max(0, t - max_prefix) : t]. Checked for the sampler (all strategies), for
`build_rlp_inputs` (prompts and teacher windows), for the window bound that config validation
uses, and for the data-parallel split (a document's contexts on one rank).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rlp.config import ConfigError, load_config
from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.data.contexts import ContextSampler, max_window_tokens
from megatron_rlp.data.corpus import TokenizedCorpus

PAD, MIN_PREFIX, MAX_PREFIX = 99_999, 8, 40


@pytest.fixture(scope="module")
def corpus() -> TokenizedCorpus:
    """Documents shorter and much longer than max_prefix, tokens unique per document."""
    rng = np.random.default_rng(0)
    lengths = [30, 45, 60] + rng.integers(60, 400, size=37).tolist()
    docs = [np.arange(1000 * i, 1000 * i + n, dtype=np.int32) for i, n in enumerate(lengths)]
    return TokenizedCorpus(path="mem", documents=docs, eos=0)


def _entropy(windows):  # a fake teacher: deterministic pseudo-entropies
    return [np.sin(np.asarray(w, dtype=np.float64)) for w in windows]


CASES = [("uniform", 1, 1, 0), ("uniform", 2, 1, 0), ("uniform", 8, 1, 0),
         ("stride", 4, 7, 0), ("stride", 8, 4, 0), ("entropy", 4, 1, 0),
         ("uniform", 8, 1, 12), ("entropy", 4, 1, 200), ("uniform", 4, 1, 200)]


@pytest.mark.parametrize("strategy,ppd,stride,band", CASES)
def test_every_prefix_is_full_and_the_window_is_bounded(corpus, strategy, ppd, stride, band):
    sampler = ContextSampler(corpus, MIN_PREFIX, MAX_PREFIX, seed=1, strategy=strategy,
                             stride=stride, scorer=_entropy, band=band)
    bound = max_window_tokens(MIN_PREFIX, MAX_PREFIX, ppd, strategy, stride, band)
    if band:  # a band wider than max_prefix - min_prefix + 1 is capped at it
        assert bound == MAX_PREFIX + min(band, MAX_PREFIX - MIN_PREFIX + 1) - 1
    longest = 0
    for step in range(6):
        contexts = sampler.sample(step, 4 * ppd, ppd)
        for g in range(0, len(contexts), ppd):
            group = contexts[g:g + ppd]
            doc = corpus.documents[group[0].doc_index]
            ws = max(0, group[0].position - MAX_PREFIX)
            for c in group:
                t = c.position
                assert np.array_equal(c.prefix, doc[ws:t])
                assert len(c.prefix) >= min(t, MAX_PREFIX) >= MIN_PREFIX
                # it contains the rule's prefix doc[max(0, t - max_prefix) : t]
                assert np.array_equal(c.prefix[len(c.prefix) - min(t, MAX_PREFIX):],
                                      doc[max(0, t - MAX_PREFIX):t])
            longest = max(longest, group[-1].position - ws)
    assert longest <= bound
    if ppd == 1:  # one position: exactly its full prefix, as before issue 11
        assert bound == MAX_PREFIX
    if strategy == "stride":  # the spread is fixed: long documents reach the bound
        assert longest == bound


def test_build_rlp_inputs_feeds_the_sampler_prefixes(corpus):
    sampler = ContextSampler(corpus, MIN_PREFIX, MAX_PREFIX, seed=2)
    contexts = sampler.sample(3, 12, 4)
    prompts, win = build_rlp_inputs(contexts, list(range(12)), corpus, MAX_PREFIX, PAD)
    assert prompts.lengths.tolist() == [len(c.prefix) for c in contexts]
    for b, c in enumerate(contexts):
        got = prompts.tokens[b][prompts.valid[b]]
        assert torch.equal(got, torch.as_tensor(c.prefix, dtype=torch.long))
        row, col = int(win.rows[b]), int(win.cols[b])
        window = win.tokens[row][win.valid[row]]
        first = int((~win.valid[row]).sum())
        # the teacher reads the same prefix: the window's columns up to col
        assert torch.equal(win.tokens[row, first:col + 1], got)
        doc = corpus.documents[c.doc_index]
        group = [d.position for d in contexts if d.doc_index == c.doc_index]
        ws = max(0, min(group) - MAX_PREFIX)
        assert torch.equal(window, torch.as_tensor(doc[ws:max(group)], dtype=torch.long))


def test_one_document_window_starts_before_its_first_position():
    doc = np.arange(100, 200, dtype=np.int32)
    corpus = TokenizedCorpus(path="mem", documents=[doc], eos=0)
    from megatron_rlp.data.contexts import Context
    contexts = [Context(0, t, doc[5:t], int(doc[t])) for t in (45, 70)]
    prompts, win = build_rlp_inputs(contexts, [0, 1], corpus, max_prefix=40, pad=PAD)
    assert prompts.lengths.tolist() == [40, 65]  # ws = 45 - 40 = 5: 70 keeps >= 40 tokens
    assert win.tokens.shape == (1, 65) and int(win.tokens[0, 0]) == 105


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_prefixes_do_not_depend_on_the_data_parallel_split(corpus, dp):
    """The split `rlp_step.local_contexts` makes (contiguous slices, a whole number of
    documents per rank, which config validation enforces) gives every context the prefix it
    has on one rank."""
    ppd, n = 4, 16
    contexts = ContextSampler(corpus, MIN_PREFIX, MAX_PREFIX, seed=4).sample(7, n, ppd)
    whole, _ = build_rlp_inputs(contexts, list(range(n)), corpus, MAX_PREFIX, PAD)
    per_rank = n // dp
    for rank in range(dp):
        ids = list(range(rank * per_rank, (rank + 1) * per_rank))
        part, _ = build_rlp_inputs([contexts[i] for i in ids], ids, corpus, MAX_PREFIX, PAD)
        for j, i in enumerate(ids):
            assert torch.equal(part.tokens[j][part.valid[j]], whole.tokens[i][whole.valid[i]])
    # The split that would break this (a document over two ranks) is refused up front.
    load_config(None, ("rlp.contexts_per_step=16", "rlp.positions_per_document=4",
                       "model.max_sequence_length=1024"), world_size=dp)
    with pytest.raises(ConfigError, match="rlp.positions_per_document=4"):
        load_config(None, ("rlp.contexts_per_step=16", "rlp.positions_per_document=4",
                           "model.max_sequence_length=1024"), world_size=8)


def test_config_checks_the_longest_window():
    base = ("rlp.min_prefix_tokens=16", "rlp.max_prefix_tokens=128",
            "rlp.max_thought_tokens=16", "rlp.contexts_per_step=8")
    cfg = load_config(None, (*base, "rlp.positions_per_document=1",
                             "model.max_sequence_length=146"))
    assert cfg.rlp.max_window_tokens() == 128  # one position: windows of max_prefix
    # Two positions: windows up to 128 + 112 = 240 tokens, + <think> + 16 + </think> = 258.
    with pytest.raises(ConfigError, match=r"model\.max_sequence_length=256 .*>= 258 .*window"):
        load_config(None, (*base, "rlp.positions_per_document=2",
                           "model.max_sequence_length=256"))
    cfg = load_config(None, (*base, "rlp.positions_per_document=2",
                             "model.max_sequence_length=258"))
    assert cfg.rlp.max_window_tokens() == 240
    cfg = load_config(None, (*base, "rlp.positions_per_document=4", "rlp.position_stride=8",
                             "rlp.position_strategy=stride", "model.max_sequence_length=200"))
    assert cfg.rlp.max_window_tokens() == 128 + 3 * 8
    # A narrower band bounds the window: 128 + 32 - 1 tokens.
    cfg = load_config(None, (*base, "rlp.positions_per_document=8",
                             "rlp.position_band_tokens=32", "model.max_sequence_length=177"))
    assert cfg.rlp.max_window_tokens() == 159
    with pytest.raises(ConfigError, match=r"rlp\.positions_per_document=8 .*position_band_"):
        load_config(None, (*base, "rlp.positions_per_document=8", "rlp.position_band_tokens=4"))
    with pytest.raises(ConfigError, match=r"rlp\.position_band_tokens=-1"):
        load_config(None, (*base, "rlp.position_band_tokens=-1"))
