"""The padded vocabulary size: a leaf that the model provider, checkpoints, conversion and
Megatron-LM interop all read without importing the provider."""

from __future__ import annotations

from megatron_rlp.utils import ceil_to


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Pad the vocabulary to a multiple of `divisible_by` (config requires TP to divide it).

    Megatron-LM pads to a multiple of `divisible_by * TP`, which makes the embedding shape
    depend on the layout; here it does not, so every layout starts from identical weights and
    checkpoints move between TP sizes.
    """
    return ceil_to(vocab_size, divisible_by)
