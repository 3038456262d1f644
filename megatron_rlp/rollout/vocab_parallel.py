"""Sampling and log-probs from tensor-parallel (vocabulary-sharded) logits without gathering
them.

Gumbel-max is a max over the vocabulary, so it splits over shards: each TP rank adds the
keyed noise of its own vocabulary slice (`keyed_uniform` is indexed by the global token id),
takes its local winner, and the ranks agree on the best (score, token) pair. The behaviour
log-prob needs the global log-sum-exp: two scalar all-reduces per row (max, sum of exp), as
in Megatron's `vocab_parallel_cross_entropy`. Per row and step a rank moves O(TP) numbers
instead of the V / TP logits a gather would move.

Top-p needs the global order of probabilities; with `top_p < 1` the shards are gathered and
the full-vocabulary sampler runs (the paper samples at temperature 0.7 without top-p).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from torch import Tensor

from megatron_rlp.rollout.sampling import gumbel_from_uniform, keyed_uniform, sample_tokens


def mask_padded_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """-inf on this shard's ids >= vocab_size (Megatron's vocabulary padding)."""
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    ids = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def sample_vocab_parallel(logits: Tensor, keys: Tensor, temperature: float, top_p: float,
                          vocab_size: int) -> tuple[Tensor, Tensor]:
    """`sample_tokens` for vocabulary-sharded logits; the same tokens as on one rank.

    Args:
        logits: [R, V/tp] this rank's shard.
        keys: [R, K] sampling keys.
        vocab_size: the tokenizer's vocabulary; padded ids are never drawn.

    Returns:
        tokens: [R] long global ids; logprobs: [R] fp32 temperature-scaled log-probs. Identical
        on every rank of the TP group.
    """
    logits = mask_padded_vocab(logits.float(), vocab_size)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return sample_tokens(logits, keys, temperature, top_p)
    if top_p < 1.0:
        return sample_tokens(gather_from_tensor_model_parallel_region(logits), keys,
                             temperature, top_p)
    group = parallel_state.get_tensor_model_parallel_group()
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    scaled = logits / temperature
    noise = gumbel_from_uniform(keyed_uniform(keys, start, start + shard))
    best, index = (scaled + noise).max(dim=-1)
    # Agree on the winner: gather every rank's (score, global id); the first maximum wins,
    # which is the lowest global id on ties, as torch.argmax over the full vocabulary does.
    pairs = torch.stack([best.double(), (index + start).double()])  # ids < 2**53: exact
    gathered = [torch.empty_like(pairs) for _ in range(tp)]
    dist.all_gather(gathered, pairs, group=group)
    scores = torch.stack([g[0] for g in gathered])  # [tp, R]
    winner = scores.argmax(dim=0)
    tokens = torch.stack([g[1] for g in gathered]).gather(0, winner[None])[0].long()
    # log_softmax at the winner: global max and sum of exp, then this rank's share of z_token.
    zmax = scaled.max(dim=-1).values
    dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    sumexp = (scaled - zmax[:, None]).exp().sum(dim=-1)
    dist.all_reduce(sumexp, group=group)
    local = tokens - start
    mine = (local >= 0) & (local < shard)
    z_token = torch.where(mine, scaled.gather(1, local.clamp(0, shard - 1)[:, None])[:, 0], 0.0)
    dist.all_reduce(z_token, group=group)
    return tokens, z_token - zmax - sumexp.log()


def token_logprobs_vocab_parallel(logits: Tensor, targets: Tensor, vocab_size: int,
                                  temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[target] over the real vocabulary, for vocab-sharded logits;
    differentiable. Padded ids are excluded, as they are when sampling.

    Args:
        logits: [..., V/tp] this rank's vocabulary shard.
        targets: [...] global token ids.
        vocab_size: the tokenizer's vocabulary (unpadded).
    """
    logits = mask_padded_vocab(logits.float(), vocab_size)
    if not torch.is_grad_enabled() and parallel_state.get_tensor_model_parallel_world_size() == 1:
        # One shard and no backward (S_pred at every decode step, S_ema): Megatron's own
        # cross-entropy arithmetic (VocabParallelCrossEntropy's steps, so bit-identical to
        # the call below) without its three all-reduces over a one-rank group (profiled: ~1/6
        # of a 0.8M rollout under gloo, tools/profile_rollout.py).
        flat, logits_max = VocabParallelCrossEntropy.calculate_logits_max(
            (logits / temperature).reshape(-1, logits.shape[-1]))
        _, _, predicted, sum_exp, exp_logits = \
            VocabParallelCrossEntropy.calculate_predicted_logits(
                flat, targets.reshape(-1), logits_max, 0, flat.shape[-1])
        _, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted,
                                                                         sum_exp)
        return -loss.reshape(targets.shape)
    flat = (logits / temperature).reshape(1, -1, logits.shape[-1])
    return -vocab_parallel_cross_entropy(flat, targets.reshape(1, -1)).reshape(targets.shape)
