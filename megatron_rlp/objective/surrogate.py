"""PPO-style clipped surrogate over thought tokens, the only loss term of RLP.

L_i = -(1/|c_i|) sum_u min(rho_u A_i, clip(rho_u, 1 - eps_low, 1 + eps_high) A_i), averaged over
the N = B*G thoughts. Each thought is first averaged over its own tokens, so long and short
thoughts weigh the same. Everything is computed in fp32 (fp64 stays fp64) whatever the input
dtype: exp of a bf16 log-ratio is too coarse for a ratio that must sit near 1.
"""

from __future__ import annotations

import torch


def _clip_terms(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the inputs; return (unclipped [N, T], clipped [N, T], token mask [N, T] bool).

    Positions outside the mask get a log-ratio of 0, so padding holding -inf or garbage
    log-probs yields neither NaN values nor NaN gradients.
    """
    if logp_new.dim() != 2:
        raise ValueError(f"logp_new must be [N, T], got shape {tuple(logp_new.shape)}")
    if logp_old.shape != logp_new.shape or mask.shape != logp_new.shape:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and mask "
            f"{tuple(mask.shape)} must have the same [N, T] shape"
        )
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(
            f"advantages must be [N] = [{logp_new.shape[0]}], got {tuple(advantages.shape)}"
        )
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    valid = mask.bool()
    if not bool(valid.any(dim=1).all()):
        empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"every thought needs at least one token; empty mask in rows {empty}")

    dtype = torch.promote_types(logp_new.dtype, torch.float32)
    log_ratio = torch.where(valid, logp_new.to(dtype) - logp_old.detach().to(dtype), 0.0)
    rho = torch.exp(log_ratio)
    adv = advantages.detach().to(dtype).unsqueeze(1)
    unclipped = rho * adv
    clipped = torch.clamp(rho, 1.0 - eps_low, 1.0 + eps_high) * adv
    return unclipped, clipped, valid


def clipped_surrogate_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clipped-surrogate loss, token-mean within each thought, mean over thoughts.

    Args:
        logp_new: [N, T] log pi_theta of each thought token under the current policy (grad).
        logp_old: [N, T] log pi_theta_old of the same tokens, from sampling (no grad).
        advantages: [N] advantage of each thought (no grad).
        mask: [N, T] bool or float; nonzero marks the thought's tokens (`</think>` included).
        eps_low: lower clip range, rho is clipped below at 1 - eps_low.
        eps_high: upper clip range, rho is clipped above at 1 + eps_high.
        token_weights: optional [N, T] per-token weights (no grad), e.g. truncated importance
            weights (`policy_loss.truncated_importance_weights`); each token's term is
            multiplied by its weight.

    Returns:
        [] loss in fp32 (fp64 for fp64 `logp_new`); its gradient flows only through `logp_new`.

    Raises:
        ValueError: on shape mismatches, a negative clip range or a row with an empty mask.
    """
    unclipped, clipped, valid = _clip_terms(logp_new, logp_old, advantages, mask, eps_low, eps_high)
    per_token = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        if token_weights.shape != per_token.shape:
            raise ValueError(f"token_weights must be {tuple(per_token.shape)}, got "
                             f"{tuple(token_weights.shape)}")
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    per_token = torch.where(valid, per_token, 0.0)
    per_thought = per_token.sum(dim=1) / valid.sum(dim=1)
    return per_thought.mean()


@torch.no_grad()
def clip_fraction(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> torch.Tensor:
    """Fraction of thought tokens whose clipped term is the one the min selects.

    Args:
        logp_new: [N, T] log pi_theta of each thought token under the current policy.
        logp_old: [N, T] log pi_theta_old of the same tokens.
        advantages: [N] advantage of each thought.
        mask: [N, T] bool or float; nonzero marks the thought's tokens.
        eps_low: lower clip range.
        eps_high: upper clip range.

    Returns:
        [] fp32 fraction, over all masked tokens, where rho*A > clip(rho)*A strictly (the
        token then carries no gradient).
    """
    unclipped, clipped, valid = _clip_terms(logp_new, logp_old, advantages, mask, eps_low, eps_high)
    active = (unclipped > clipped) & valid
    return active.sum().float() / valid.sum().float()
