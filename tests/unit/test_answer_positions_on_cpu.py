"""eval/answer_positions.py: RLP targets at the task's answer starts (those written without a
worked thought), found in token ids, drawn by the project's ContextSampler."""

from __future__ import annotations

import random

import numpy as np

from megatron_rlp.data.corpus import TokenizedCorpus
from megatron_rlp.eval.answer_positions import (
    ANSWER_MARKER,
    AnswerContextSampler,
    answer_start_mask,
)
from megatron_rlp.eval.tasks import corpus_document, items
from megatron_rlp.tokenizer.byte import ByteTokenizer


def test_mask_marks_answers_without_a_thought_only():
    tok = ByteTokenizer()
    text = "Question: What is 1 + 2?\nAnswer: 3\nQuestion: x?\nAnswer: <think>1+1=2</think>2"
    ids = np.asarray(tok.encode(text))
    mask = answer_start_mask(ids, np.asarray(tok.encode(ANSWER_MARKER)), tok.think_start)
    hits = np.flatnonzero(mask)
    assert len(hits) == 1  # the second answer follows a worked thought: not a target
    assert tok.decode(ids[hits[0]:hits[0] + 1].tolist()) == "3"
    assert tok.decode(ids[:hits[0]].tolist()).endswith("Answer: ")
    # A marker at the very end (no answer token after it) and a too-short document: none.
    end = np.asarray(tok.encode("Answer: "))
    assert not answer_start_mask(end, np.asarray(tok.encode(ANSWER_MARKER)),
                                 tok.think_start).any()


def test_sampler_draws_answer_starts_deterministically():
    tok = ByteTokenizer()
    stream, rng = items(7, held_out=False), random.Random(7)
    docs = [corpus_document(stream, rng, 4, think_rate=0.5) for _ in range(40)]
    ids = [np.asarray(tok.encode(d["text"]), dtype=np.int32) for d in docs]
    corpus = TokenizedCorpus(path="mem", documents=ids, eos=tok.eos)
    kw = dict(marker=tok.encode(ANSWER_MARKER), think_start=tok.think_start)
    sampler = AnswerContextSampler(corpus, 16, 128, seed=3, **kw)
    contexts = sampler.sample(step=5, num_contexts=8)
    assert len(contexts) == 8
    for c in contexts:
        doc = corpus.documents[c.doc_index]
        assert tok.decode(doc[c.position - 8:c.position].tolist()) == ANSWER_MARKER
        assert chr(c.target).isdigit()  # the answer's first digit (byte ids are bytes)
        assert c.target == doc[c.position] and len(c.prefix) >= 16
    again = AnswerContextSampler(corpus, 16, 128, seed=3, **kw).sample(step=5, num_contexts=8)
    assert [(c.doc_index, c.position) for c in again] == \
        [(c.doc_index, c.position) for c in contexts]
    # Several positions per document: all of them answer starts, inside one window.
    many = sampler.sample(step=6, num_contexts=4, positions_per_doc=2)
    for c in many:
        doc = corpus.documents[c.doc_index]
        assert tok.decode(doc[c.position - 8:c.position].tolist()) == ANSWER_MARKER
