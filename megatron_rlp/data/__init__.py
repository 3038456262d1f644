"""Pretraining data for RLP: corpus loading, context sampling and next-token batches."""

from megatron_rlp.data.contexts import Context, ContextSampler, NTPBatcher
from megatron_rlp.data.corpus import TokenizedCorpus, load_corpus

__all__ = ["Context", "ContextSampler", "NTPBatcher", "TokenizedCorpus", "load_corpus"]
