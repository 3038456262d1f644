"""Checkpoint conversion between Hugging Face models and this project's Megatron checkpoints
(tools/convert_checkpoint.py is the command line; docs/data_and_models.md the guide)."""

from megatron_rlp.convert.checkpoints import (
    hf_to_megatron,
    load_megatron,
    megatron_to_hf,
    read_hf,
    write_hf,
)
from megatron_rlp.convert.errors import ConversionError
from megatron_rlp.convert.mapping import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "ConversionError",
    "hf_to_megatron",
    "load_megatron",
    "megatron_to_hf",
    "read_hf",
    "write_hf",
]
