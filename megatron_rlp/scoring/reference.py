"""The frozen reference policy of the KL penalty (`rlp.kl_coef` > 0, objective/kl.py).

pi_ref = the policy's weights at the start of the RLP stage: copied from the policy on the
first RLP step (before any update, as the EMA teacher is) and never changed after. Built
only when beta > 0 (a full model shard costs memory). Like the EMA teacher it is an fp32
model from its own fp32 config, sharded like the policy (same TP/PP), and part of every
checkpoint (`checkpoint/sharded.py`, key `reference`), so a resumed run keeps the reference
of its first step rather than the resumed weights.

Written as a subclass of `EMATeacher` (same copy and parameter matching; `update` is
refused): Megatron has no frozen-reference holder outside megatron.training's RL loop.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_rlp.packing.forward import packed_forward
from megatron_rlp.parallel.pipeline import from_last_stage, stage_forward
from megatron_rlp.parallel.sequence import sequence_parallel_off
from megatron_rlp.rollout.vocab_parallel import token_logprobs_vocab_parallel
from megatron_rlp.scoring.ema_teacher import EMATeacher


class FrozenReference(EMATeacher):
    """pi_ref: `initialize_from(policy)` once, then read-only.

    Args:
        model: a freshly built fp32 model with the policy's architecture and layout.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model, decay=1.0)

    def update(self, policy: nn.Module) -> None:
        raise RuntimeError("the KL reference policy is frozen; it is never updated")


@torch.no_grad()
def reference_logprobs(reference: nn.Module, batch: dict[str, Tensor], vocab_size: int,
                       temperature: float) -> Tensor:
    """log pi_ref of an update micro-batch's thought tokens, at the update's temperature.

    Runs the reference over exactly what the policy's gradient forward reads: an unpacked
    micro-batch (`data.batches.update_batch`: causal rows) or a packed one
    (`packing.update`: tree mask, per-token RoPE positions), logits only at `index`.

    Args:
        reference: `FrozenReference.model` (this rank's stage, or chunks).
        batch: the micro-batch: tokens, positions [m, S]; index, labels [m, K]; for packed
            ones branch, lo, hi [m, S].
        vocab_size: the tokenizer's vocabulary; temperature: the sampling temperature.

    Returns:
        [m, K] fp32 log-probs on every pipeline stage (0-filled where `index` is unused).
    """
    with sequence_parallel_off(reference), packed_forward(reference, batch) as mask:
        logits = stage_forward(reference, batch["tokens"], batch["positions"], mask)
    logp = None
    if logits is not None:
        logp = token_logprobs_vocab_parallel(logits, batch["labels"], vocab_size, temperature)
    return from_last_stage(logp, tuple(batch["labels"].shape), torch.float32)
