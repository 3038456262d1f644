"""Small integer helpers shared by every layer of the package (a leaf: it imports nothing of
megatron_rlp, so data, models, packing and train can all use it)."""

from __future__ import annotations


def ceil_to(x: int, multiple: int) -> int:
    """`x` rounded up to a multiple of `multiple` (>= 1): sequence widths under sequence
    parallel or FP8 alignment, padded vocabularies."""
    return -(-x // multiple) * multiple
