"""The RLP update (RLP.md, "One training step", step 5): the step's thought rows laid out as
micro-batches, one forward step and one loss for every layout.

A layout is chosen by name (`update_layout`, `UPDATE_LAYOUTS`):

    unpacked  one right-padded causal sequence per thought (`data.batches.update_batch`), cut
              to each micro-batch's own width without pipeline parallelism;
    packed    `rlp.share_prefixes` with a micro-batch size that packs: a document's thoughts
              as branches after one copy of its window (`packing.update`), one forward per
              window instead of one per thought.

Both hold the same thought rows with the same labels, masks and rollout log-probs, so
`rlp_loss` is one function (`objective.rlp_policy_loss` on the [rows, L] thought tokens, plus
the KL penalty when `rlp.kl_coef` > 0) and `rlp_forward_step` one Megatron forward step
(`packing.forward.packed_forward` sets the model up for either layout).
tests/unit/test_packed_update.py shows the two layouts give the same loss and gradients.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor

from megatron_rlp.data.batches import split_microbatches, trimmed_microbatches, update_batch
from megatron_rlp.objective import rlp_policy_loss
from megatron_rlp.objective.kl import kl_penalty
from megatron_rlp.packing.flex import resolve as resolve_packed_attention
from megatron_rlp.packing.forward import packed_forward
from megatron_rlp.packing.update import packable, packed_update_batches
from megatron_rlp.rollout.vocab_parallel import token_logprobs_vocab_parallel


def rlp_loss(batch: dict[str, Tensor], scale: float, vocab_size: int, temperature: float,
             eps: tuple[float, float], logits: Tensor, *, logp_old_source: str = "update",
             tis_cap: float = 2.0, kl_coef: float = 0.0):
    """Clipped surrogate on this micro-batch's thought rows; `scale` makes the micro-batch sum
    a local mean (`microbatch_scale`).

    Args:
        batch: the micro-batch: labels, mask, logp_old [m, K*L] (K thought rows per sequence:
            1 unpacked); advantages [m*K] or [m, K]; with `kl_coef` > 0 also logp_ref (the
            frozen reference's log-probs, `scoring.reference`).
        logits: [m, K*L, V/tp] at `batch["index"]` (`rlp_forward_step`).
        eps: (clip_eps_low, clip_eps_high).
        logp_old_source: what divides the ratio (objective/policy_loss.py); `logp_old` holds
            the rollout's log-probs.
        kl_coef: adds kl_coef x the k3 KL penalty to the reference (objective/kl.py; metric
            `kl_ref`).

    Returns:
        (loss x scale, metrics: `loss` and `rlp_policy_loss`'s, detached). Log-probs are fp32
        from the logits.
    """
    rows = batch["advantages"].numel()
    logp_new = token_logprobs_vocab_parallel(logits, batch["labels"], vocab_size, temperature)
    logp_new, mask = logp_new.reshape(rows, -1), batch["mask"].reshape(rows, -1)
    loss, metrics = rlp_policy_loss(logp_new, batch["logp_old"].reshape(rows, -1),
                                    batch["advantages"].reshape(-1), mask, *eps,
                                    logp_old_source, tis_cap)
    if kl_coef:
        kl = kl_penalty(logp_new, batch["logp_ref"].reshape(rows, -1), mask)
        loss, metrics = loss + kl_coef * kl, {**metrics, "kl_ref": kl.detach()}
    return loss * scale, {"loss": loss.detach(), **metrics}


def rlp_forward_step(scale: float, vocab_size: int, temperature: float,
                     eps: tuple[float, float], data_iterator, model, *,
                     attention: str = "mask", **loss_options):
    """Megatron `forward_step_func` (see `train.update`) of an update micro-batch of either
    layout: the policy forward with logits at the thought-predicting positions, and
    `rlp_loss` (`loss_options`: its keyword arguments).

    `attention` (packed micro-batches): `mask` passes the explicit [B, 1, S, S] tree mask to
    Megatron's attention; `flex` passes the [B, 3, S] tree descriptor, which `packing.flex`
    routes to FlexAttention (block-sparse on CUDA).
    """
    batch = next(data_iterator)
    with packed_forward(model, batch, attention) as mask:
        logits = model(batch["tokens"], batch["positions"], mask,
                       padding_mask=batch.get("padding_mask"))  # MoE: models.moe_routing
    return logits, partial(rlp_loss, batch, scale, vocab_size, temperature, eps,
                           **loss_options)


def microbatch_scale(microbatches: list[dict[str, Tensor]], rows: int) -> float:
    """The loss scale that turns Megatron's mean over micro-batches into the mean over this
    rank's `rows` thoughts: (thought rows of a micro-batch) x (micro-batches) / rows."""
    return microbatches[0]["advantages"].numel() * len(microbatches) / rows


def update_layout(cfg, rows: int) -> str:
    """`packed` when `rlp.share_prefixes` is on and `train.micro_batch_size` packs this
    rank's `rows` thoughts (`packing.update.packable`: 0, or a multiple or divisor of a
    document's rows), else `unpacked`."""
    r = cfg.rlp
    if r.share_prefixes and packable(cfg.model.hybrid_layer_pattern,
                                     r.positions_per_document * r.group_size, rows,
                                     cfg.train.micro_batch_size):
        return "packed"
    return "unpacked"


def packed_attention(cfg) -> str:
    """The core attention of the packed update: `model.packed_attention` resolved
    (`packing.flex.resolve`: `flex` or `mask`)."""
    return resolve_packed_attention(cfg.model.packed_attention, cfg.device.type,
                                    cfg.model.hybrid_layer_pattern)


def unpacked_microbatches(cfg, tok, ro, multiple: int, equal_width: bool
                          ) -> list[dict[str, Tensor]]:
    """The unpacked layout of a scored rollout (`train.rlp_step.ScoredRollout`): one row per
    thought, widths a multiple of `multiple`; `equal_width` (pipeline parallel: the schedule
    sends one activation shape) keeps the step's width, else each micro-batch is trimmed."""
    batch = update_batch(ro.prompts, ro.thoughts, ro.advantages, cfg.rlp.group_size, tok.pad,
                         list(ro.lead), multiple)
    if getattr(ro, "routing", None) is not None:  # MoE: the rollout's experts, row-aligned
        batch["rollout_routing"] = ro.routing.to(batch["index"].device)
    if equal_width:
        return split_microbatches(batch, cfg.train.micro_batch_size)
    return trimmed_microbatches(batch, cfg.train.micro_batch_size, multiple)


def packed_microbatches(cfg, tok, ro, multiple: int, equal_width: bool
                        ) -> list[dict[str, Tensor]]:
    """The packed layout of a scored rollout (`packing.update.packed_update_batches`), for
    the core attention `packed_attention(cfg)` runs with. Shared by `rlp_step` and the
    `megatron.training` plugin."""
    return packed_update_batches(ro.windows, ro.prompts, ro.thoughts, ro.advantages,
                                 cfg.rlp.group_size, cfg.train.micro_batch_size, tok.pad,
                                 list(ro.lead), equal_width=equal_width, multiple=multiple,
                                 model_cfg=cfg.model,
                                 block_sparse=packed_attention(cfg) in ("flex", "split"),
                                 routing=getattr(ro, "routing", None))


UPDATE_LAYOUTS = {"unpacked": unpacked_microbatches, "packed": packed_microbatches}
