"""The tiny models the rollout, shared-prefill and packed-update tests share, fp32 on the
CPU backend, seed 0: dense (2 attention + 2 MLP layers, hidden 64, GQA 4 heads / 2 groups)
and hybrid (the same attention and MLP with two Mamba-2 layers, RoPE, 4 Mamba heads of 16,
state 8, 2 groups), also with full activation recomputation."""

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
TINY_HYBRID = TINY_DENSE[1:] + ("model.hybrid_layer_pattern=M*-M-", "model.mamba_num_heads=4",
                                "model.mamba_head_dim=16", "model.mamba_state_dim=8",
                                "model.mamba_num_groups=2")
TINY = {"dense": TINY_DENSE, "hybrid": TINY_HYBRID,
        # Megatron's full activation recomputation: layers re-run their forward in backward.
        "hybrid-recompute": TINY_HYBRID + ("train.recompute_granularity=full",
                                           "train.recompute_num_layers=1"),
        # attention + MoE layers (Megatron's MoE layer, 4 local experts, top-2)
        "moe": TINY_DENSE[1:] + ("model.hybrid_layer_pattern=*E*E", "model.num_experts=4",
                                 "model.moe_ffn_hidden_size=32")}

# A tiny RLP step's shape over TINY's layers (tests/unit/test_compiled_update.py,
# tests/e2e/test_teacher_cancellation.py). Adam with eps 1 is SGD-like (lr * g / (1 + |g|)),
# a smooth function of the gradient; with a small eps its first step is lr * sign(g), which
# turns rounding noise on a near-zero gradient into a full +-lr step.
TINY_STEP = ("model.max_sequence_length=64", "rlp.contexts_per_step=4", "rlp.group_size=3",
             "rlp.max_thought_tokens=4", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32",
             "train.seed=7", "optimizer.lr=1.0", "optimizer.adam_eps=1.0")


@contextlib.contextmanager
def tiny_model(vocab_size: int, kind: str = "dense") -> Iterator[torch.nn.Module]:
    """The `kind` model inside Megatron's (one-rank) parallel state; torn down on exit."""
    cfg = load_config(None, TINY[kind])
    distributed.initialize(cfg)
    torch.manual_seed(0)
    try:
        yield build_model(cfg, vocab_size)
    finally:
        distributed.shutdown()


def tiny_dense_model(vocab_size: int):
    """`tiny_model(vocab_size, "dense")`."""
    return tiny_model(vocab_size, "dense")
