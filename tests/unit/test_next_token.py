"""`rollout.vocab_parallel.token_logprobs_vocab_parallel`'s no-grad, one-shard path (S_pred at
every decode step, S_ema) is bit-identical to Megatron's `vocab_parallel_cross_entropy`,
which it skips only for its all-reduces over a one-rank group."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import tiny_dense_model

from megatron_rlp.rollout.vocab_parallel import token_logprobs_vocab_parallel


@pytest.mark.parametrize("shape", [(7, 300), (3, 5, 260)])
def test_fast_path_equals_megatrons_cross_entropy_bit_for_bit(shape):
    with tiny_dense_model(256):  # Megatron's one-rank parallel state
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(*shape, generator=gen) * 5
        vocab = shape[-1] - 4  # the padded columns are masked out
        targets = torch.randint(0, vocab, shape[:-1], generator=gen)
        with torch.no_grad():
            fast = token_logprobs_vocab_parallel(logits, targets, vocab, 0.7)
        with torch.enable_grad():  # grad mode takes Megatron's autograd function
            megatron = token_logprobs_vocab_parallel(logits.clone().requires_grad_(), targets,
                                                     vocab, 0.7).detach()
    assert fast.shape == targets.shape
    assert torch.equal(fast, megatron)
    assert bool((fast < 0).all())
