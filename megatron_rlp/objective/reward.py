"""RLP information-gain reward: how much a thought raised the log-probability of the true token.

r(c) = log p_theta(x_t | x_<t, c) - log pbar_phi(x_t | x_<t). Both scores come from no-grad
forwards and the reward is a constant for the policy update, so it is detached here once,
whatever the caller passes in.
"""

from __future__ import annotations

import torch


def info_gain_reward(logp_pred: torch.Tensor, logp_ema: torch.Tensor) -> torch.Tensor:
    """Information-gain reward of each thought.

    Args:
        logp_pred: [...] log p_theta(x_t | x_<t, c) of the reasoned predictor (for a k-token
            target, the sum of the k log-probs), e.g. [B, G].
        logp_ema: [...] log pbar_phi(x_t | x_<t) of the no-think EMA teacher, same shape.

    Returns:
        [...] detached rewards `logp_pred - logp_ema`, in at least fp32 (a bf16 policy score
        minus an fp32 teacher score must not round to bf16).

    Raises:
        ValueError: if the shapes differ (broadcasting would silently pair wrong thoughts).
    """
    if logp_pred.shape != logp_ema.shape:
        raise ValueError(
            f"logp_pred {tuple(logp_pred.shape)} and logp_ema {tuple(logp_ema.shape)} must have "
            "the same shape"
        )
    dtype = torch.promote_types(torch.promote_types(logp_pred.dtype, logp_ema.dtype), torch.float32)
    return logp_pred.detach().to(dtype) - logp_ema.detach().to(dtype)
