"""The RLP objective as pure tensor functions: reward, group advantage, clipped surrogate."""

from megatron_rlp.objective.advantages import group_advantages
from megatron_rlp.objective.policy_loss import (
    LOGP_OLD_SOURCES,
    logp_disagreement,
    rlp_policy_loss,
    truncated_importance_weights,
)
from megatron_rlp.objective.reward import info_gain_reward
from megatron_rlp.objective.surrogate import clip_fraction, clipped_surrogate_loss

__all__ = ["LOGP_OLD_SOURCES", "clip_fraction", "clipped_surrogate_loss", "group_advantages",
           "info_gain_reward", "logp_disagreement", "rlp_policy_loss",
           "truncated_importance_weights"]
