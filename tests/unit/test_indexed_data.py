"""Megatron indexed datasets as RLP document sources: preprocessing, splits, blends, NTP
windows, position strategies, SentencePiece tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_rlp.config import ConfigError, load_config
from megatron_rlp.data import ContextSampler, NTPBatcher, load_corpus, load_data
from megatron_rlp.data.contexts import top_entropy_positions
from megatron_rlp.data.indexed import BlendError, parse_blend, split_corpus
from megatron_rlp.tokenizer import ByteTokenizer, build_tokenizer
from tools.preprocess_data import main as preprocess_main
from tools.preprocess_data import preprocess

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "<think>", "</think>", "é", "ok"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for _ in range(100)]
    texts[3] = ""  # empty: skipped
    path = tmp_path_factory.mktemp("jsonl") / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def prefix(jsonl):
    out = str(jsonl.parent / "c_byte")
    meta = preprocess([jsonl], out, "byte", workers=1, progress=False)
    assert meta["documents"] == 99 and meta["skipped_empty"] == 1 and meta["append_eod"]
    return out


def test_preprocess_keeps_documents_and_order(jsonl, prefix, tmp_path):
    assert preprocess_main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "w2"),
                            "--workers", "2", "--chunk-size", "7", "--quiet"]) == 0
    for ext in (".bin", ".idx"):  # identical bytes whatever the worker count
        assert (tmp_path / f"w2{ext}").read_bytes() == open(prefix + ext, "rb").read()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    ref = load_corpus(jsonl, TOK)
    assert len(ds) == len(ref) == 99
    for i in range(len(ref)):
        doc = ds.get(i)
        assert doc[-1] == TOK.eod and np.array_equal(doc[:-1], ref.documents[i])


def test_preprocess_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        preprocess([bad], str(tmp_path / "x"), "byte", progress=False)
    assert not (tmp_path / "x.bin").exists()
    assert preprocess_main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix",
                            str(tmp_path / "y"), "--quiet"]) == 1


def test_indexed_corpus_matches_jsonl_and_split(jsonl, prefix):
    ref = load_corpus(jsonl, TOK)
    data = load_data(prefix, None, "90,10,0", TOK, seed=5)
    ref_train, ref_valid, ref_test = split_corpus(ref, "90,10,0")
    assert ref_test is None and data.test is None
    for got, want in ((data.train, ref_train), (data.valid, ref_valid)):
        ids = got.parts[0].document_ids
        want_docs = {tuple(d) for d in want.documents}
        assert len(got) == len(want) and {tuple(got.documents[i]) for i in range(len(got))} \
            == want_docs
        assert np.array_equal(got.lengths, [len(got.documents[i]) for i in range(len(got))])
        assert sorted(ids) == list(ids.min() + np.arange(len(ids)))  # a contiguous range
    # The same order on every build (any rank, a resumed run); another seed shuffles it.
    again = load_data(prefix, None, "90,10,0", TOK, seed=5).train.parts[0].document_ids
    other = load_data(prefix, None, "90,10,0", TOK, seed=6).train.parts[0].document_ids
    assert np.array_equal(again, data.train.parts[0].document_ids)
    assert not np.array_equal(other, again)
    jsonl_data = load_data(str(jsonl), None, "90,10,0", TOK, seed=5)
    assert len(jsonl_data.train) == 89 and len(jsonl_data.valid) == 10


def test_blend_weights_and_ntp_windows(jsonl, prefix, tmp_path):
    other = str(tmp_path / "other")
    (tmp_path / "o.jsonl").write_text("".join(json.dumps({"text": "zzzz " * 20 + str(i)})
                                              + "\n" for i in range(30)))
    preprocess([tmp_path / "o.jsonl"], other, "byte", progress=False)
    data = load_data("unused", ["0.25", prefix, "0.75", other], "100,0,0", TOK, seed=1)
    share = np.bincount(data.train.part_index) / len(data.train)
    assert abs(share[0] - 0.25) < 0.02 and abs(share[1] - 0.75) < 0.02
    zs = sum(int(np.all(data.train.documents[i][:4] == ord("z"))) for i in range(len(data.train)))
    assert zs == np.bincount(data.train.part_index)[1]

    batcher = NTPBatcher(data.train, seq_length=32, seed=1)
    batch = batcher.batch(3, 4)
    assert batch.shape == (4, 33) and batch.dtype == np.int64
    assert np.array_equal(batch, NTPBatcher(data.train, 32, 1).batch(3, 4))
    assert not np.array_equal(batch, batcher.batch(4, 4))
    assert (batch == TOK.eod).any()  # documents joined by their end-of-document ids


def test_uncached_blend_notice_comes_once(prefix, caplog):
    """Megatron logs its `path_to_cache is None` notice per split built; a blend run with NTP
    windows said it four times. Once now, naming data.cache_dir."""
    import logging

    from megatron_rlp.data import indexed

    indexed._CacheNoticeOnce.said = False
    with caplog.at_level(logging.WARNING):
        data = load_data("unused", ["0.5", prefix, "0.5", prefix], "90,10,0", TOK, seed=1)
        data.train.gpt_windows(32, 1)
    said = [r.getMessage() for r in caplog.records if "path_to_cache" in r.getMessage()]
    assert len(said) == 1 and "data.cache_dir" in said[0], said


def test_config_blend_and_split(prefix):
    cfg = load_config(None, (f"data.blend=0.3 {prefix} 0.7 {prefix}", "data.split=98,2,0"))
    assert cfg.data.blend == ["0.3", prefix, "0.7", prefix]
    assert parse_blend([f"0.3 {prefix}", 0.7, prefix]) == ([prefix, prefix], [0.3, 0.7])
    assert parse_blend("a b") == (["a", "b"], None)
    for bad in ("0.5 a 0.5", "a 0.5 b", "-1 a"):
        with pytest.raises(BlendError):
            parse_blend(bad)
    for override, key in (("data.blend=0.5 /no/such", "data.blend"),
                          ("data.split=0,1,0", "data.split"),
                          ("data.split=a,b", "data.split"),
                          ("train.eval_interval=5", "train.eval_interval"),
                          ("rlp.position_strategy=best", "rlp.position_strategy")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, (override,))
    with pytest.raises(ConfigError, match="rlp.positions_per_document"):
        load_config(None, ("rlp.position_strategy=stride", "rlp.position_stride=100",
                           "rlp.positions_per_document=4", "rlp.contexts_per_step=8"))


def _check_windows(contexts, corpus, k, min_prefix, max_prefix):
    for g in range(0, len(contexts), k):
        group = contexts[g:g + k]
        doc = corpus.documents[group[0].doc_index]
        ws = max(0, group[0].position - max_prefix)  # what batches.build_rlp_inputs feeds
        for c in group:
            assert c.doc_index == group[0].doc_index and c.target == doc[c.position]
            assert np.array_equal(c.prefix, doc[ws:c.position])
            assert min_prefix <= min(c.position, max_prefix) <= len(c.prefix)
            assert len(c.prefix) <= max_prefix + (max_prefix - min_prefix)


@pytest.mark.parametrize("strategy", ["uniform", "stride", "entropy"])
def test_position_strategies(prefix, strategy):
    corpus = load_data(prefix, None, "100,0,0", TOK, seed=0).train
    calls = []

    def scorer(windows):  # a fake teacher: entropy = token id, so the largest ids win
        calls.append(len(windows))
        return [w.astype(np.float64)[1:].tolist() + [0.0] for w in windows]

    make = lambda: ContextSampler(corpus, 8, 40, seed=3, strategy=strategy, stride=5,  # noqa: E731
                                  scorer=scorer)
    a = make().sample(7, 12, 3)
    b = make().sample(7, 12, 3)
    assert [(c.doc_index, c.position) for c in a] == [(c.doc_index, c.position) for c in b]
    _check_windows(a, corpus, 3, 8, 40)
    for g in range(0, 12, 3):
        pos = [c.position for c in a[g:g + 3]]
        assert pos == sorted(set(pos))
        if strategy == "stride":
            assert np.diff(pos).tolist() == [5, 5]
        doc = corpus.documents[a[g].doc_index]
        if strategy == "entropy" and len(doc) - 1 <= 40:  # band = the whole document:
            best = np.argsort(-doc[8:].astype(np.int64), kind="stable")[:3]  # largest targets
            assert pos == sorted((8 + best).tolist())
    if strategy == "entropy":
        assert calls == [4, 4]  # one scorer call per step, all documents at once
    one = make().sample(1, 4, 1)
    _check_windows(one, corpus, 1, 8, 40)


def test_top_entropy_positions():
    h = np.array([0.0, 5.0, 1.0, 5.0, 3.0, 9.0])  # window starts at 10: h[j] -> 10 + j + 1
    assert top_entropy_positions(h, 12, 16, 10, 2).tolist() == [12, 16]
    assert top_entropy_positions(h, 12, 16, 10, 3).tolist() == [12, 14, 16]  # tie: earlier
    with pytest.raises(ValueError, match="scorer"):
        ContextSampler(load_corpus.__globals__["TokenizedCorpus"](
            path="x", documents=[np.arange(50, dtype=np.int32)], eos=0), 4, 8, 0,
            strategy="entropy")


def test_tokenizer_mismatch_is_refused(prefix):
    tok = build_tokenizer("tests/assets/tiny_bpe/tokenizer.json")
    with pytest.raises(ValueError, match="re-run tools/preprocess_data.py"):
        load_data(prefix, None, "100,0,0", tok, seed=0)


def test_sentencepiece_tokenizer(jsonl, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in texts if t] * 5),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    tok = build_tokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 42 and (tok.think_start, tok.think_end) == (40, 41)
    ids = tok.encode("alpha <think>beta</think> gamma")
    assert ids.count(tok.think_start) == 1 and ids.count(tok.think_end) == 1
    # SentencePiece drops the spaces next to a marker (it encodes each side on its own).
    assert tok.decode(ids).replace(" ", "") == "alpha<think>beta</think>gamma"
    assert tok.decode(tok.encode("alpha beta gamma")) == "alpha beta gamma"
    meta = preprocess([jsonl], str(tmp_path / "sp_data"), str(tmp_path / "sp.model"),
                      progress=False)
    assert meta["vocab_size"] == 42 and meta["documents"] == 99
