"""Tokenizers: byte round trips, special ids, and Hugging Face tokenizer.json loading."""

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_rlp.tokenizer import (
    THINK_END,
    THINK_START,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
)

TINY_BPE = Path(__file__).resolve().parents[1] / "assets" / "tiny_bpe"
TEXT = "Héllo wörld, 17 + 25 = 42. Ünïcödé 数学 🙂\n\tend"


def _special_ids(tok):
    return [tok.pad, tok.bos, tok.eos, tok.think_start, tok.think_end]


def _train_bpe(special_tokens: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat. 1 + 2 = 3."] * 20, trainer=trainer)
    return tok


def test_byte_round_trip_and_specials():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert _special_ids(tok) == [256, 257, 258, 259, 260]
    assert tok.vocab_size == 261 and tok.eod == tok.eos
    assert tok.decode([tok.think_start, *tok.encode("x"), tok.think_end, tok.eos]) == (
        f"{THINK_START}x{THINK_END}<eos>"
    )
    assert tok.unique_identifiers["class"] == "ByteTokenizer"


def test_byte_encodes_special_text_as_special_ids():
    tok = ByteTokenizer()
    assert tok.encode(THINK_START) == [tok.think_start]
    assert tok.encode(THINK_END) == [tok.think_end]
    assert tok.encode("<pad><bos><eos>") == [tok.pad, tok.bos, tok.eos]
    text = "17 + 25 = <think>17+25=42</think>42."
    ids = tok.encode(text)
    assert ids == [*b"17 + 25 = ", tok.think_start, *b"17+25=42", tok.think_end, *b"42."]
    assert ids.count(tok.think_start) == 1 and ids.count(tok.think_end) == 1
    assert tok.decode(ids) == text
    # Partial or altered markers stay bytes.
    for partial in ("<thin", "<think", "think>", "</think", "<THINK>", "< think>", "<eos"):
        assert tok.encode(partial) == list(partial.encode("utf-8"))
    assert tok.encode("<<think>>") == [ord("<"), tok.think_start, ord(">")]
    assert tok.encode("<thin<think>k>") == [*b"<thin", tok.think_start, *b"k>"]
    # Round trip both ways: ids with specials -> text -> the same ids.
    mixed = [*"é数".encode(), tok.think_start, *b"a<b", tok.think_end, tok.eos, *b"</", tok.bos]
    assert tok.encode(tok.decode(mixed)) == mixed
    assert tok.decode(tok.encode(TEXT + THINK_START + TEXT + THINK_END)) == (
        TEXT + THINK_START + TEXT + THINK_END
    )
    assert tok.encode_batch(["a<think>", "b"]) == [[ord("a"), tok.think_start], [ord("b")]]


def test_byte_decode_invalid_utf8_and_bad_id():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    assert tok.decode(list("é".encode())[:1] + [tok.eos]) == "\ufffd<eos>"
    with pytest.raises(ValueError, match="261"):
        tok.decode([261])


def test_hf_shipped_tokenizer():
    tok = build_tokenizer(str(TINY_BPE))  # the directory form
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 512
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learned
    assert len(set(_special_ids(tok))) == 4  # bos falls back to <|endoftext|> = eos
    assert tok.bos == tok.eos
    assert tok.encode(THINK_START) == [tok.think_start]
    assert tok.encode(THINK_END) == [tok.think_end]
    assert tok.decode([tok.think_start, tok.think_end, tok.eos, tok.pad]) == (
        "<think></think><|endoftext|><|pad|>"
    )
    assert all(0 <= i < tok.vocab_size for i in _special_ids(tok))
    assert build_tokenizer(str(TINY_BPE / "tokenizer.json")).encode(TEXT) == ids


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer(str(tmp_path))  # a directory without tokenizer.json


def test_hf_think_tokens_added_when_missing(tmp_path, caplog):
    _train_bpe(["</s>", "<s>"]).save(str(tmp_path / "tokenizer.json"))
    before = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    with caplog.at_level(logging.WARNING):
        tok = HFTokenizer(tmp_path)
    assert THINK_START in caplog.text and THINK_END in caplog.text
    assert tok.vocab_size == before + 2
    assert {tok.think_start, tok.think_end} == {before, before + 1}
    assert tok.decode(tok.encode("a<think>b</think>")) == "a<think>b</think>"
    assert tok.encode("<think>")[-1] == tok.think_start
    assert (tok.eos, tok.bos, tok.pad) == (0, 1, 0)  # </s>, <s>, pad falls back to eos


def test_hf_tokenizer_config_names_specials(tmp_path):
    _train_bpe(["<|endoftext|>", "<|im_end|>", THINK_START, THINK_END]).save(
        str(tmp_path / "tokenizer.json")
    )
    config = {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert (tok.eos, tok.pad, tok.bos) == (1, 0, 0)  # bos: <|endoftext|> by name
    config["bos_token"] = "<nope>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="<nope>"):
        HFTokenizer(tmp_path)
