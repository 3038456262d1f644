"""The RLP step's metrics: global-batch values, the same on every rank (train/reduce.py).

The update's loss metrics come per micro-batch from `train.rlp_update.rlp_loss` (last
pipeline stage only); each is combined once, over this rank's micro-batches and then over
the data-parallel ranks, the way `LOSS_METRICS` names. The rollout's (rewards, advantages,
thought lengths, S_ema, S_pred) are gathered over the data-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rlp.train.reduce import (
    gather_data_parallel,
    max_data_parallel,
    mean_data_parallel,
    share_last_stage_values,
)

# `rlp_loss`'s per-micro-batch metrics and how micro-batches and ranks combine them.
# logp_diff_*: rollout (KV-cache decode) vs update (full forward) log-probs of the thoughts.
LOSS_METRICS = {"loss": "mean", "clip_fraction": "mean", "logp_diff_mean": "mean",
                "logp_diff_max": "max", "token_mult_prob_error": "mean",
                "is_weight_mean": "mean"}
_REDUCE = {"mean": (torch.mean, mean_data_parallel), "max": (torch.max, max_data_parallel)}


def _over_microbatches(values: list[Tensor], how: str) -> float:
    return float(_REDUCE[how][0](torch.stack(values)))


def loss_metrics(losses: list[dict[str, Tensor]], optional: dict[str, list[Tensor]]
                 ) -> dict[str, float]:
    """The update's global metrics: `LOSS_METRICS`, then each of `optional` (name -> its
    per-micro-batch values, e.g. `kl_ref`, `ntp_loss`; means).

    `losses` is empty off the last pipeline stage; its values are shared from there.
    """
    local = {k: _over_microbatches([d[k] for d in losses], how) if losses else 0.0
             for k, how in LOSS_METRICS.items()}
    local.update({k: _over_microbatches(v, "mean") for k, v in optional.items() if v})
    local = share_last_stage_values(local, tuple(LOSS_METRICS) + tuple(optional))
    how = {**LOSS_METRICS, **dict.fromkeys(optional, "mean")}
    return {k: _REDUCE[how[k]][1](local[k]) for k in how}


def rlp_metrics(ro, losses: list[dict[str, Tensor]], optional: dict[str, list[Tensor]],
                grad_norm: float, applied: bool, group_size: int) -> dict[str, float]:
    """The step's metrics, in console order.

    Args:
        ro: the step's `train.rlp_step.ScoredRollout`.
        losses, optional: see `loss_metrics`.
        grad_norm, applied: from `train.update.optimizer_update`.

    Returns:
        loss and reward metrics; `tokens` is the global count of prefix, lead and thought
        tokens the update read; `skipped` 1.0 when the update was not applied;
        `teacher_scored` 1.0 when S_ema was scored this step (`rlp.teacher_scoring`). Without
        it the reward level (`reward_mean`, `reward_std`, `s_ema`) is left out: the
        advantages, and so the update, are the same without S_ema.
    """
    update = loss_metrics(losses, optional)
    prompts, thoughts = ro.prompts, ro.thoughts
    g_rewards = gather_data_parallel(ro.rewards)
    seq_lengths = prompts.lengths.repeat_interleave(group_size) + len(ro.lead) + thoughts.lengths
    tokens = gather_data_parallel(seq_lengths.float()).sum()
    metrics = {
        "loss": update["loss"],
        "reward_mean": float(g_rewards.mean()),
        "reward_std": float(g_rewards.std()),
        "advantage_std": float(gather_data_parallel(ro.advantages).std()),
        **{k: update[k] for k in LOSS_METRICS if k != "loss"},
        "thought_len": float(gather_data_parallel(thoughts.lengths.float()).mean()),
        "closed_fraction": float(gather_data_parallel(thoughts.closed.float()).mean()),
        "s_ema": float(gather_data_parallel(ro.s_ema).mean()) if ro.s_ema is not None else 0.0,
        "s_pred": float(gather_data_parallel(thoughts.s_pred).mean()),
        "grad_norm": grad_norm,
        "tokens": float(tokens),
        "skipped": float(not applied),
        **{k: update[k] for k in optional},
        "teacher_scored": float(ro.s_ema is not None),
    }
    if ro.s_ema is None:
        for key in ("reward_mean", "reward_std", "s_ema"):
            del metrics[key]
    return metrics
