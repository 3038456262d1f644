"""The RLP objective as pure tensor functions: reward, group advantage, clipped surrogate."""

from megatron_rlp.objective.advantages import group_advantages
from megatron_rlp.objective.reward import info_gain_reward
from megatron_rlp.objective.surrogate import clip_fraction, clipped_surrogate_loss

__all__ = ["clip_fraction", "clipped_surrogate_loss", "group_advantages", "info_gain_reward"]
