"""The tokenizer surface RLP relies on, shared by the byte-level default and HF tokenizers.

RLP needs more from a tokenizer than plain next-token pretraining: the thought markers
`<think>` and `</think>` must each be one id, so that a rollout can open and close a thought,
and Megatron-Core's datasets expect `eod` and `unique_identifiers`. Fixing that surface here
lets the rest of the project ignore which tokenizer is behind it.
"""

import abc
from collections.abc import Iterable, Sequence

THINK_START = "<think>"
THINK_END = "</think>"


class Tokenizer(abc.ABC):
    """Text <-> ids, plus the special ids RLP and Megatron-Core need.

    Attributes:
        name: Human-readable identity (e.g. "byte" or the tokenizer.json path).
        vocab_size: Number of ids; every id is in [0, vocab_size).
        bos: Begin-of-sequence id.
        eos: End-of-sequence id, also written between documents.
        pad: Padding id.
        think_start: Id of `<think>`, which opens a thought.
        think_end: Id of `</think>`, which closes a thought.
    """

    name: str
    vocab_size: int
    bos: int
    eos: int
    pad: int
    think_start: int
    think_end: int

    @property
    def eod(self) -> int:
        """End-of-document id (Megatron-Core naming); the same as `eos`."""
        return self.eos

    @property
    def unique_identifiers(self) -> dict[str, object]:
        """Identity of this tokenizer, used by Megatron-Core datasets to key their caches."""
        return {"class": type(self).__name__, "name": self.name, "vocab_size": self.vocab_size}

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, without adding any special token."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; specials appear as their text, bad UTF-8 as U+FFFD."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts; subclasses may override with a faster batched path."""
        return [self.encode(text) for text in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"
