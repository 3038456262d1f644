"""The tiny dense model the rollout, shared-prefill and packed-update tests share: 2 attention
+ 2 MLP layers, hidden 64, GQA (4 heads, 2 groups), fp32 on the CPU backend, seed 0."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.provider import build_model

TINY_DENSE = ("model.hybrid_layer_pattern=*-*-", "model.hidden_size=64",
              "model.ffn_hidden_size=128", "model.num_attention_heads=4",
              "model.num_query_groups=2")


@contextlib.contextmanager
def tiny_dense_model(vocab_size: int) -> Iterator[torch.nn.Module]:
    """The model inside Megatron's (one-rank) parallel state; torn down on exit."""
    cfg = load_config(None, TINY_DENSE)
    distributed.initialize(cfg)
    torch.manual_seed(0)
    try:
        yield build_model(cfg, vocab_size)
    finally:
        distributed.shutdown()
