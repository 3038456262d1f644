"""Which log-probs the clipped surrogate divides by, and the rollout-vs-update disagreement.

The surrogate's ratio rho = pi_theta / pi_old needs the log-probs of the policy that sampled
the thoughts. Two sources exist, and in bf16 they are not the same numbers: the rollout's
KV-cache decode (`ThoughtBatch.logprobs`) and the update's own full forward, before any
parameter changes. Cache vs full forward, RoPE at offset positions and a recurrent state
carried over thousands of steps all round differently, and wherever the two differ by more
than the clip range the clipped surrogate silently zeroes that token's gradient.

`rlp.logp_old_source` chooses:

- `update` (default): logp_old = the update's own detached log-probs, as TRL and verl do
  with one update per rollout (the paper's setting). rho == 1 exactly, so nothing is clipped
  at the first update, and the gradient is A * grad log pi_theta, the on-policy policy
  gradient. The rollout's log-probs only feed the disagreement metrics.
- `rollout`: the rollout's log-probs are the behaviour policy mu. The loss keeps the update's
  detached log-probs as the proximal policy of the clip (so rho == 1 at the first update, as
  above) and weights every token by the truncated importance ratio
  w = min(pi_old / mu, tis_cap), detached: decoupled PPO (Hilton et al. 2022, "Batch
  size-invariance for policy optimization", eq. 3), which is verl's truncated importance
  sampling (TIS) and NeMo-RL's importance-sampling correction for rollouts computed by
  another engine or in another precision.

So per token: L_u = -w_u * min(rho_u A, clip(rho_u, 1 - eps_low, 1 + eps_high) A), with w = 1
for `update`; averaged over each thought's tokens, then over thoughts
(`surrogate.clipped_surrogate_loss`).

Disagreement metrics, over all thought tokens of the batch (d = |log pi_update - log mu|):
`logp_diff_mean` = mean d, `logp_diff_max` = max d, and `token_mult_prob_error` = mean exp(d)
(NeMo-RL's figure: 1.0 when rollout and update agree exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rlp.objective.surrogate import clip_fraction, clipped_surrogate_loss

LOGP_OLD_SOURCES = ("update", "rollout")


def truncated_importance_weights(logp_old: Tensor, logp_rollout: Tensor, mask: Tensor,
                                 cap: float) -> Tensor:
    """w = min(exp(logp_old - logp_rollout), cap) on thought tokens, 1 elsewhere; no gradient.

    Args:
        logp_old: [N, T] log pi_old (the update's detached log-probs).
        logp_rollout: [N, T] log mu (the rollout's sampling log-probs).
        mask: [N, T] bool or float, nonzero on thought tokens.
        cap: truncation C > 0.

    Returns:
        [N, T] weights in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: cap <= 0 or shape mismatch.
    """
    if not cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    if logp_old.shape != logp_rollout.shape or mask.shape != logp_old.shape:
        raise ValueError(f"logp_old {tuple(logp_old.shape)}, logp_rollout "
                         f"{tuple(logp_rollout.shape)} and mask {tuple(mask.shape)} differ")
    dtype = torch.promote_types(logp_old.dtype, torch.float32)
    valid = mask.bool()
    log_w = torch.where(valid, logp_old.detach().to(dtype) - logp_rollout.detach().to(dtype), 0.0)
    return torch.exp(log_w).clamp(max=cap)


@torch.no_grad()
def logp_disagreement(logp_update: Tensor, logp_rollout: Tensor, mask: Tensor
                      ) -> dict[str, Tensor]:
    """Rollout-vs-update log-prob disagreement over the masked thought tokens.

    Args:
        logp_update: [N, T] log-probs of the thought tokens from the update's forward.
        logp_rollout: [N, T] the rollout's sampling log-probs of the same tokens.
        mask: [N, T] nonzero on thought tokens (at least one).

    Returns:
        `logp_diff_mean` (mean |d|), `logp_diff_max` (max |d|) and `token_mult_prob_error`
        (mean exp|d|), 0-dim fp32 tensors (fp64 for fp64 inputs).
    """
    dtype = torch.promote_types(logp_update.dtype, torch.float32)
    valid = mask.bool()
    d = torch.where(valid, (logp_update.to(dtype) - logp_rollout.to(dtype)).abs(), 0.0)
    n = valid.sum().to(dtype)
    return {
        "logp_diff_mean": d.sum() / n,
        "logp_diff_max": d.max(),
        "token_mult_prob_error": torch.where(valid, d.exp(), 0.0).sum() / n,
    }


def rlp_policy_loss(logp_new: Tensor, logp_rollout: Tensor, advantages: Tensor, mask: Tensor,
                    eps_low: float, eps_high: float, logp_old_source: str = "update",
                    tis_cap: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The update's loss for one micro-batch, with its diagnostics.

    With one update per rollout the update's detached log-probs are exactly pi_old (the
    parameters have not moved since the rollout); the caller must not reuse a batch for a
    second update under this function.

    Args:
        logp_new: [N, T] log pi_theta of the thought tokens (carries the gradient).
        logp_rollout: [N, T] the rollout's sampling log-probs (no grad).
        advantages: [N]; mask: [N, T] nonzero on thought tokens.
        eps_low, eps_high: clip ranges.
        logp_old_source: `update` or `rollout` (see the module docstring).
        tis_cap: truncation of the importance weight (`rollout` only).

    Returns:
        (0-dim loss, metrics): `clip_fraction`, `is_weight_mean` (1 for `update`) and the
        `logp_disagreement` figures, all detached.

    Raises:
        ValueError: unknown source, and what `clipped_surrogate_loss` raises.
    """
    if logp_old_source not in LOGP_OLD_SOURCES:
        raise ValueError(f"logp_old_source must be one of {LOGP_OLD_SOURCES}, "
                         f"got {logp_old_source!r}")
    logp_old = logp_new.detach()
    weights = None
    if logp_old_source == "rollout":
        weights = truncated_importance_weights(logp_old, logp_rollout, mask, tis_cap)
    args = (logp_new, logp_old, advantages, mask, eps_low, eps_high)
    loss = clipped_surrogate_loss(*args, token_weights=weights)
    metrics = logp_disagreement(logp_old, logp_rollout, mask)
    valid = mask.bool()
    w_mean = (torch.ones_like(metrics["logp_diff_mean"]) if weights is None
              else torch.where(valid, weights, 0.0).sum() / valid.sum())
    return loss, {"clip_fraction": clip_fraction(*args), "is_weight_mean": w_mean, **metrics}
