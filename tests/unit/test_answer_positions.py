"""`train.eval_position_strategy=answer` (data/answer_positions.py): a task corpus's
`answer_offsets` become token positions of the answers' first tokens (thought markers are one
token each), survive the train/valid split, and the sampler draws held-out contexts there,
never right after a corpus `</think>`."""

from __future__ import annotations

import json

import pytest

from megatron_rlp.config import load_config
from megatron_rlp.data.answer_positions import AnswerPositionSampler
from megatron_rlp.data.corpus import load_corpus
from megatron_rlp.data.indexed import split_corpus
from megatron_rlp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _record(items: list[tuple[str, str, str | None]]) -> dict:
    """Lines `Question: q\\nAnswer: [<think>w</think>]a`, with the answers' offsets."""
    text, offsets = "", []
    for q, a, work in items:
        line = f"Question: {q}\nAnswer: " + (f"<think>{work}</think>" if work else "")
        offsets.append(len(text) + len(line))
        text += line + a + "\n"
    return {"text": text, "answer_offsets": offsets}


@pytest.fixture
def corpus_file(tmp_path):
    records = [_record([("What is 17 + 25?", "42", None), ("What is 8 + 5?", "13", "8+5=13")]),
               _record([("What is 70 + 29?", "99", None)]),
               {"text": "plain text, no answers here"}]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_offsets_become_token_positions(corpus_file):
    corpus = load_corpus(corpus_file, TOK)
    pos = corpus.answer_positions
    assert [p.tolist() != [] for p in pos] == [True, True, False]
    doc0 = corpus.documents[0]
    assert [chr(doc0[t]) for t in pos[0]] == ["4", "1"]
    assert int(doc0[pos[0][1] - 1]) == TOK.think_end  # `</think>` is one token
    assert chr(corpus.documents[1][pos[1][0]]) == "9"
    train, valid, _ = split_corpus(corpus, "2,1,0")
    assert len(train.answer_positions) == 2 and valid.answer_positions[0].tolist() == []
    txt = corpus_file.with_suffix(".txt")
    txt.write_text("a b\n\nc d")
    assert load_corpus(txt, TOK).answer_positions is None  # no answers: no field


def test_sampler_draws_answers_outside_worked_items(corpus_file):
    corpus = load_corpus(corpus_file, TOK)
    sampler = AnswerPositionSampler(corpus, min_prefix=4, max_prefix=16, seed=3,
                                    think_end=TOK.think_end)
    contexts = sampler.sample(0, 6)
    def where(cs):
        return [(c.doc_index, c.position) for c in cs]

    assert where(contexts) == where(sampler.sample(0, 6))  # deterministic in (seed, step)
    for c in contexts:
        doc = corpus.documents[c.doc_index]
        assert chr(doc[c.position]) in "49" and c.target == int(doc[c.position])
        assert len(c.prefix) == min(16, c.position)
    assert {c.doc_index for c in contexts[:2]} == {0, 1}  # documents without replacement first
    with pytest.raises(ValueError, match="no answer positions"):
        AnswerPositionSampler(load_corpus(corpus_file, TOK), min_prefix=500, max_prefix=600,
                              seed=0)


def test_config_accepts_answer():
    assert load_config(None, ("train.eval_position_strategy=answer",)
                       ).train.eval_position_strategy == "answer"
