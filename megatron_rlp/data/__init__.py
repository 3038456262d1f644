"""Pretraining data for RLP: corpus loading (JSONL/.txt or Megatron indexed datasets), context
sampling and next-token batches."""

from megatron_rlp.data.contexts import (
    Context,
    ContextSampler,
    NTPBatcher,
    PositionScorer,
    build_context_sampler,
)
from megatron_rlp.data.corpus import TokenizedCorpus, load_corpus
from megatron_rlp.data.indexed import DataSplits, IndexedCorpus, load_data

__all__ = [
    "Context",
    "ContextSampler",
    "DataSplits",
    "IndexedCorpus",
    "NTPBatcher",
    "PositionScorer",
    "TokenizedCorpus",
    "build_context_sampler",
    "load_corpus",
    "load_data",
]
