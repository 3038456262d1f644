"""Byte-level tokenizer: the embedded default, so that nothing needs a tokenizer file.

Ids 0..255 are the UTF-8 bytes; the specials follow. Any text round-trips exactly, which makes
it the safe choice for tests and toy models.
"""

from collections.abc import Iterable

from megatron_rlp.tokenizer.base import THINK_END, THINK_START, Tokenizer

_SPECIALS = ("<pad>", "<bos>", "<eos>", THINK_START, THINK_END)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then the five specials.

    Specials: `<pad>`=256, `<bos>`=257, `<eos>`=258, `<think>`=259, `</think>`=260.
    """

    def __init__(self) -> None:
        self.name = "byte"
        self.pad, self.bos, self.eos, self.think_start, self.think_end = range(256, 261)
        self.vocab_size = 256 + len(_SPECIALS)

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of `text` (a literal "<think>" stays bytes, not a special)."""
        return list(text.encode("utf-8"))

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
