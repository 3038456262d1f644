"""Corpus files that are not valid UTF-8, or hold a lone surrogate escape, are refused with
the file, the line and what is wrong, as invalid JSON is: by the trainer's corpus reader
(data/corpus.py), tools/preprocess_data.py (one `error:` line, exit 1) and `pretrain_rlp.py`
(one `error:` line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_rlp.data import load_corpus
from megatron_rlp.tokenizer import ByteTokenizer
from tools.preprocess_data import main as preprocess_main
from tools.preprocess_data import preprocess

ROOT = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()


def bad_byte_jsonl(path: Path) -> tuple[int, int]:
    """20 good lines, then one whose text holds a Latin-1 'é' (0xe9); returns (line, offset)."""
    good = "".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(20))
    data = good.encode() + b'{"text": "caf\xe9 au lait"}\n' + b'{"text": "fine"}\n'
    path.write_bytes(data)
    return 21, data.index(b"\xe9")


def test_invalid_utf8_names_file_line_and_file_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    line, offset = bad_byte_jsonl(path)
    assert offset > 8192  # past the first buffer: Python's own position would be wrong
    with pytest.raises(ValueError) as err:
        load_corpus(path, TOK)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: invalid UTF-8 (byte 0xe9 at file offset {offset}, "
                          "column 14"), msg
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{line}: invalid UTF-8 \(byte 0xe9 at "
                       rf"file offset {offset}"):
        preprocess([path], str(tmp_path / "x"), "byte", progress=False)
    assert not (tmp_path / "x.bin").exists()


def test_invalid_utf8_in_a_text_corpus_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"first doc\n\nsecond\nthird \xff here\n")
    for call in (lambda: load_corpus(path, TOK),
                 lambda: preprocess([path], str(tmp_path / "x"), "byte", progress=False)):
        with pytest.raises(ValueError, match=r"bad\.txt:4: invalid UTF-8 \(byte 0xff at file "
                           r"offset 24, column 7"):
            call()


def test_lone_surrogate_is_refused_with_its_line(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok \\ud83d\\ude00"}\n')  # an escaped pair: one emoji, valid
    assert len(load_corpus(path, TOK).documents[0]) == 3 + 4
    path.write_text('{"text": "ok"}\n{"text": "ab\\ud800cd"}\n')  # a lone escape: line 2
    with pytest.raises(ValueError) as err:
        load_corpus(path, TOK)
    assert str(err.value).startswith(f'{path}:2: lone surrogate \\ud800 in the "text" field '
                                     "at character 2"), err.value
    assert preprocess_main(["--input", str(path), "--output-prefix", str(tmp_path / "y"),
                            "--quiet", "--workers", "1"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:2: lone surrogate \\ud800")


def test_the_trainer_names_the_line(tmp_path):
    from helpers.checkpoint_helpers import main

    path = tmp_path / "bad.jsonl"
    line, offset = bad_byte_jsonl(path)
    run = main("train.steps=1", f"data.corpus={path}")
    assert run.rc == 2, run.err[-2000:]
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and "[rlp step" not in run.out, lines
    assert lines[0].startswith(f"error: data.corpus='{path}' cannot be used: {path}:{line}: "
                               f"invalid UTF-8 (byte 0xe9 at file offset {offset}"), lines[0]
