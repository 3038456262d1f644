"""Loading a pretraining corpus into token arrays, one per document.

RLP samples contexts (document, position) rather than fixed windows, so document boundaries
are kept: each document becomes its own int32 array. Loading is strict, because a silently
skipped or mangled line would quietly change what the model trains on.
"""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from megatron_rlp.data.utf8 import check_text, read_utf8, utf8_lines
from megatron_rlp.tokenizer import Tokenizer


@dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """Documents as token arrays.

    Attributes:
        path: The file the corpus was read from.
        documents: One read-only int32 array of token ids per document, none empty.
        eos: End-of-sequence id of the tokenizer, written between documents when they are
            concatenated.
        answer_positions: Per document, the token positions of its answers' first tokens
            (JSONL records with `answer_offsets`, eval/tasks.py), or None when the corpus
            has none; the held-out evaluation's `answer` positions.
    """

    path: Path
    documents: list[np.ndarray]
    eos: int
    answer_positions: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.documents)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Token count of every document (int64)."""
        return np.array([len(doc) for doc in self.documents], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all documents."""
        return int(self.lengths.sum())


def _text_of(record: object) -> str | None:
    """Returns record["text"] if `record` is an object with a string "text" field."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    return None


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line of a JSONL file.

    Raises:
        ValueError: a line that is not JSON or not UTF-8 (file and line named).
    """
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def _read_jsonl(path: Path, offsets: list | None = None) -> list[str]:
    """Returns the "text" field of every non-blank line of a JSONL file; appends each record's
    "answer_offsets" (a list of character offsets, or None) to `offsets` when given."""
    texts = []
    for lineno, record in jsonl_records(path):
        text = _text_of(record)
        if text is None:
            raise ValueError(
                f'{path}:{lineno}: expected an object with a string "text" field'
            )
        texts.append(check_text(path, lineno, text))
        if offsets is not None:
            found = record.get("answer_offsets")
            ok = isinstance(found, list) and all(isinstance(o, int) and 0 <= o < len(text)
                                                 for o in found)
            offsets.append(found if ok else None)
    return texts


def _token_positions(text: str, offsets: list[int], tokenizer: Tokenizer) -> np.ndarray:
    """Character offsets -> token positions (the token count of the text before each)."""
    return np.array([len(tokenizer.encode(text[:o])) for o in offsets], dtype=np.int64)


def _read_txt(path: Path) -> list[str]:
    """Returns the documents of a text file, separated by blank lines."""
    blocks = re.split(r"\n[ \t\r]*\n", read_utf8(path))
    return [block.strip() for block in blocks if block.strip()]


def load_corpus(path: str | Path, tokenizer: Tokenizer) -> TokenizedCorpus:
    """Reads and tokenizes a corpus.

    Args:
        path: A `.txt` file (documents separated by blank lines) or a JSONL file (any other
            suffix) with one `{"text": ...}` object per line; blank lines are ignored.
        tokenizer: Tokenizer for the documents; no special token is added.

    Returns:
        The tokenized corpus; documents that tokenize to nothing are dropped.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: A JSONL line is not valid JSON or lacks a string "text" field, the file is
            not UTF-8 or a text holds a lone surrogate (the message names file and line), or
            no document has any token.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    offsets: list = []
    texts = _read_txt(path) if path.suffix == ".txt" else _read_jsonl(path, offsets)
    documents, answers = [], []
    for i, ids in enumerate(tokenizer.encode_batch(texts)):
        if ids:
            doc = np.asarray(ids, dtype=np.int32)
            doc.setflags(write=False)  # contexts hand out views of it
            documents.append(doc)
            found = offsets[i] if offsets else None
            answers.append(np.zeros(0, dtype=np.int64) if not found
                           else _token_positions(texts[i], found, tokenizer))
    if not documents:
        raise ValueError(f"{path}: no usable document (the corpus is empty)")
    has_answers = any(len(a) for a in answers)
    return TokenizedCorpus(path=path, documents=documents, eos=tokenizer.eos,
                           answer_positions=answers if has_answers else None)
