"""KL penalty to a frozen reference policy: `rlp.kl_coef` (beta; RLP.md: 0 in the paper, whose
1e-4 and 1e-3 did worse).

Per thought token u, with d_u = log pi_ref(c_u | ...) - log pi_theta(c_u | ...), the k3
estimator of KL(pi_theta || pi_ref) (Schulman, "Approximating KL divergence", 2020; the one
GRPO adds to its loss, DeepSeekMath eq. 4):

    k3_u = exp(d_u) - d_u - 1            >= 0, unbiased for KL under samples from pi_theta

Its gradient through log pi_theta is (1 - exp(d_u)) * grad log pi_theta. Aggregated like the
surrogate (`surrogate.clipped_surrogate_loss`): token-mean within each thought, mean over
thoughts; the update adds beta times it to the loss. The reference's log-probs carry no
gradient (a frozen fp32 model, `scoring.reference`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def k3_per_token(logp_new: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """k3 = exp(ref - new) - (ref - new) - 1 on thought tokens, 0 elsewhere.

    Args:
        logp_new: [N, T] log pi_theta of the thought tokens (carries the gradient).
        logp_ref: [N, T] log pi_ref of the same tokens (detached here).
        mask: [N, T] bool or float, nonzero on thought tokens.

    Returns:
        [N, T] in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: shape mismatch.
    """
    if logp_new.shape != logp_ref.shape or mask.shape != logp_new.shape:
        raise ValueError(f"logp_new {tuple(logp_new.shape)}, logp_ref {tuple(logp_ref.shape)} "
                         f"and mask {tuple(mask.shape)} differ")
    dtype = torch.promote_types(logp_new.dtype, torch.float32)
    valid = mask.bool()
    d = torch.where(valid, logp_ref.detach().to(dtype) - logp_new.to(dtype), 0.0)
    return torch.where(valid, torch.expm1(d) - d, 0.0)


def kl_penalty(logp_new: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """Mean over thoughts of the token-mean k3 (see the module docstring).

    Args:
        logp_new, logp_ref, mask: [N, T], as for `k3_per_token`; every row has a token.

    Returns:
        [] fp32 (fp64 for fp64 inputs), >= 0; gradient only through `logp_new`.

    Raises:
        ValueError: shape mismatch or a row without thought tokens.
    """
    k3 = k3_per_token(logp_new, logp_ref, mask)
    count = mask.bool().sum(1)
    if bool((count == 0).any()):
        raise ValueError("every thought needs at least one token in mask")
    return (k3.sum(1) / count).mean()
