"""SentencePiece `.model` files (optional: `pip install megatron-rlp[convert]` or `sentencepiece`).

SentencePiece models rarely have the thought markers as pieces. When a marker is not a piece
of its own it gets an id past the model's vocabulary (`<think>` = n, `</think>` = n + 1 for a
model of n pieces), and `encode` turns each exact occurrence of its text into that id, as the
byte tokenizer does for its specials; `decode` renders it as its text (the text on each side
is encoded on its own, so SentencePiece drops a space next to a marker: decode(encode(x)) can
differ from x there). The embedding must cover `vocab_size`, which counts those ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron_rlp.tokenizer.base import THINK_END, THINK_START, Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with RLP's special ids resolved.

    Args:
        path: The `.model` file.

    Raises:
        ImportError: The `sentencepiece` package is not installed.
        FileNotFoundError: No file at `path`.
        ValueError: The model has no end-of-sequence piece.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("SentencePiece tokenizers need the `sentencepiece` package "
                              "(pip install sentencepiece)") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        self.name = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        n = self._sp.get_piece_size()
        self.eos = self._sp.eos_id()
        if self.eos < 0:
            raise ValueError(f"{path}: the SentencePiece model has no end-of-sequence piece")
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos
        self._extra: dict[str, int] = {}
        ids = []
        for marker in (THINK_START, THINK_END):
            piece = self._sp.piece_to_id(marker)
            if piece == self._sp.unk_id() or self._sp.id_to_piece(piece) != marker:
                piece = n + len(self._extra)
                self._extra[marker] = piece
            ids.append(piece)
        self.think_start, self.think_end = ids
        self._marker_text = {i: t for t, i in self._extra.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self._extra) + ")") \
            if self._extra else None
        self.vocab_size = n + len(self._extra)

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, without adding any special token."""
        if self._split is None or "<" not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._extra:
                ids.append(self._extra[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._split is None:
            return self._sp.encode(list(texts))
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; the added thought markers appear as their text."""
        parts: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)
            if i in self._marker_text:
                parts.append(self._sp.decode(run))
                run = []
                parts.append(self._marker_text[i])
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)
