"""Byte-level tokenizer: the embedded default, so that nothing needs a tokenizer file.

Ids 0..255 are the UTF-8 bytes; the specials follow. Like a Hugging Face tokenizer with added
special tokens, `encode` turns each special's own text (`<think>`, `</think>`, `<bos>`, ...)
into its single id, so a corpus can contain thoughts written as `<think>...</think>`, and
`decode` renders specials as that same text: any text round-trips exactly, which makes it the
safe choice for tests and toy models.
"""

import re
from collections.abc import Iterable

from megatron_rlp.tokenizer.base import THINK_END, THINK_START, Tokenizer

_SPECIALS = ("<pad>", "<bos>", "<eos>", THINK_START, THINK_END)
_SPECIAL_IDS = {text: 256 + i for i, text in enumerate(_SPECIALS)}
# Longest first, so that no special's text could be shadowed by a shorter one it contains.
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in sorted(_SPECIALS, key=len, reverse=True)))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then the five specials.

    Specials: `<pad>`=256, `<bos>`=257, `<eos>`=258, `<think>`=259, `</think>`=260.
    """

    def __init__(self) -> None:
        self.name = "byte"
        self.pad, self.bos, self.eos, self.think_start, self.think_end = range(256, 261)
        self.vocab_size = 256 + len(_SPECIALS)

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`: its UTF-8 bytes, except that each exact occurrence of a
        special's text (e.g. "<think>") becomes that special's id; a partial one stays bytes."""
        if "<" not in text:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        start = 0
        for match in _SPECIAL_RE.finditer(text):
            ids.extend(text[start : match.start()].encode("utf-8"))
            ids.append(_SPECIAL_IDS[match.group()])
            start = match.end()
        ids.extend(text[start:].encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; specials appear as their text, bad UTF-8 as U+FFFD.

        Raises:
            ValueError: An id is outside [0, vocab_size).
        """
        parts: list[str] = []
        pending = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                pending.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the byte vocabulary [0, {self.vocab_size})")
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            parts.append(_SPECIALS[i - 256])
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)
