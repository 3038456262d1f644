"""Activation recomputation (`train.recompute_granularity`) goes to Megatron's own paths:
`full` checkpoints whole layers, `selective` the core attention. Checked on the tensors the
forward keeps for backward (autograd's saved-tensor hooks) and on the gradients, which must
not change."""

from __future__ import annotations

import pytest
import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.provider import build_model

SHAPE = ("model.hybrid_layer_pattern=*-*-*-*-", "model.hidden_size=64",
         "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.max_sequence_length=256")
VOCAB = 261


def _cfg(granularity: str, hybrid: bool = False):
    if hybrid:  # M-M*-M-: Mamba layers go through the same checkpointing
        return load_config("examples/configs/tiny_hybrid_cpu.yaml", (
            f"train.recompute_granularity={granularity}", "train.recompute_num_layers=2"))
    return load_config(None, (*SHAPE, f"train.recompute_granularity={granularity}",
                              "train.recompute_num_layers=2"))


@pytest.fixture(scope="module")
def initialized():
    distributed.initialize(_cfg("none"))
    yield
    distributed.shutdown()


def _run(granularity: str, hybrid: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes saved for backward by one training forward, and the gradients."""
    model = build_model(_cfg(granularity, hybrid), VOCAB).train()
    tokens = torch.randint(0, 256, (2, 192), generator=torch.Generator().manual_seed(0))
    saved = []

    def pack(t: torch.Tensor):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, torch.arange(192).expand(2, -1), None)
    logits.float().logsumexp(-1).mean().backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("hybrid", [False, True], ids=["dense", "hybrid"])
def test_recompute_keeps_less_and_changes_no_gradient(initialized, hybrid):
    base_bytes, base_grads = _run("none", hybrid)
    for granularity in ("selective", "full"):
        kept, grads = _run(granularity, hybrid)
        if granularity == "full" or not hybrid:  # the hybrid has one attention layer
            assert kept < 0.9 * base_bytes, (granularity, kept, base_bytes)
        else:
            assert kept < base_bytes
        for name, g in base_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    full_bytes, _ = _run("full", hybrid)
    selective_bytes, _ = _run("selective", hybrid)
    assert full_bytes < selective_bytes  # whole layers vs only the attention scores
