"""Group-relative advantages for RLP: a leave-one-out baseline over the G thoughts of a context.

A_i = G/(G-1) * (r_i - mean_j r_j) equals r_i - mean_{j != i} r_j, so the baseline does not
depend on the thought it scores and the policy-gradient estimate stays unbiased. No division
by the group std: the rewards are log-probability gains with a meaningful scale.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of each thought within its context's group.

    Args:
        rewards: [B, G] rewards of G thoughts for each of B contexts.

    Returns:
        [B, G] detached advantages `G/(G-1) * (r - mean_G(r))`, in at least fp32.

    Raises:
        ValueError: if `rewards` is not 2-D or G < 2 (a single thought has no baseline).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    group = rewards.shape[1]
    if group < 2:
        raise ValueError(
            f"group advantages need at least 2 thoughts per context (G >= 2), got G={group}"
        )
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    return group / (group - 1) * (r - r.mean(dim=1, keepdim=True))
