"""Tokenizers for RLP: an embedded byte-level default and Hugging Face tokenizer.json files.

Every tokenizer exposes the thought markers `<think>` / `</think>` as single ids, which RLP's
rollouts need to open and close a thought.
"""

from megatron_rlp.tokenizer.base import THINK_END, THINK_START, Tokenizer
from megatron_rlp.tokenizer.byte import ByteTokenizer
from megatron_rlp.tokenizer.hf import HFTokenizer

__all__ = [
    "THINK_END",
    "THINK_START",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "build_tokenizer",
]


def build_tokenizer(spec: str) -> Tokenizer:
    """Builds the tokenizer named by `spec`.

    Args:
        spec: "byte" for the embedded byte tokenizer, the path of a SentencePiece `.model`
            file, or else the path of a Hugging Face tokenizer.json or of a directory
            containing one.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: `spec` is a path with no tokenizer.json.
    """
    if spec.strip() == "byte":
        return ByteTokenizer()
    if spec.endswith(".model"):  # SentencePiece (optional dependency)
        from megatron_rlp.tokenizer.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(spec)
    return HFTokenizer(spec)
