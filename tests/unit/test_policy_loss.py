"""logp_old source (update / rollout + truncated IS) and the rollout-vs-update disagreement
metrics, against float64 python references."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlp.objective import (
    logp_disagreement,
    rlp_policy_loss,
    truncated_importance_weights,
)


def batch(seed: int = 0, n: int = 6, t: int = 9):
    """Rollout log-probs off by up to +-1.5 nats from the update's (rho_mu from 0.22 to 4.5)."""
    gen = torch.Generator().manual_seed(seed)
    logp_new = -3 * torch.rand(n, t, generator=gen, dtype=torch.float64)
    logp_rollout = logp_new + 3 * torch.rand(n, t, generator=gen, dtype=torch.float64) - 1.5
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = torch.arange(t)[None] < lengths[:, None]
    return logp_new, logp_rollout, adv, mask


def ref_loss_and_grad(logp_new, logp_rollout, adv, mask, cap):
    """-(1/N) sum_i (1/|c_i|) sum_u w_u A_i rho_u with rho = 1 at the first update
    (d rho / d logp_new = 1); w = min(exp(new - rollout), cap), or 1 when cap is None."""
    new, mu, a, m = logp_new.tolist(), logp_rollout.tolist(), adv.tolist(), mask.tolist()
    n = len(new)
    loss, grad = 0.0, [[0.0] * len(new[0]) for _ in new]
    for i in range(n):
        count = sum(m[i])
        for u in range(len(new[i])):
            if not m[i][u]:
                continue
            w = 1.0 if cap is None else min(math.exp(new[i][u] - mu[i][u]), cap)
            loss -= w * a[i] / count / n
            grad[i][u] = -w * a[i] / count / n
    return loss, torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("source,cap", [("update", None), ("rollout", 2.0), ("rollout", 1e9)])
def test_loss_and_gradient_match_float64_reference(source, cap):
    logp_new, logp_rollout, adv, mask = batch()
    new = logp_new.clone().requires_grad_(True)
    loss, metrics = rlp_policy_loss(new, logp_rollout, adv, mask, 0.2, 0.28, source,
                                    tis_cap=cap or 2.0)
    loss.backward()
    ref, ref_grad = ref_loss_and_grad(logp_new, logp_rollout, adv, mask, cap)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(new.grad, ref_grad, rtol=1e-12, atol=1e-14)
    # rho == 1 at the first update whatever the rollout said: nothing is clipped.
    assert metrics["clip_fraction"].item() == 0.0
    if source == "update":
        assert metrics["is_weight_mean"].item() == 1.0


def test_rollout_logprobs_as_denominator_would_clip():
    """Why `update` is the default: the same batch divided by the rollout's log-probs
    clips a large share of tokens (the old behaviour), each losing its gradient."""
    from megatron_rlp.objective import clip_fraction

    logp_new, logp_rollout, adv, mask = batch()
    assert clip_fraction(logp_new, logp_rollout, adv, mask, 0.2, 0.28).item() > 0.2


def test_disagreement_metrics_match_reference():
    logp_new, logp_rollout, adv, mask = batch(seed=3)
    got = logp_disagreement(logp_new, logp_rollout, mask)
    d = [abs(a - b) for ra, rb, rm in zip(logp_new.tolist(), logp_rollout.tolist(),
                                          mask.tolist(), strict=True)
         for a, b, m in zip(ra, rb, rm, strict=True) if m]
    assert got["logp_diff_mean"].item() == pytest.approx(sum(d) / len(d), rel=1e-12)
    assert got["logp_diff_max"].item() == pytest.approx(max(d), rel=1e-12)
    assert got["token_mult_prob_error"].item() == pytest.approx(
        sum(math.exp(x) for x in d) / len(d), rel=1e-12)
    # Padding may hold anything (here: huge values) without touching the figures.
    junk = torch.where(mask, logp_rollout, torch.full_like(logp_rollout, 1e6))
    again = logp_disagreement(logp_new, junk, mask)
    assert all(again[k].item() == got[k].item() for k in got)
    same = logp_disagreement(logp_new, logp_new.clone(), mask)
    assert same["logp_diff_max"].item() == 0.0 and same["token_mult_prob_error"].item() == 1.0


def test_truncated_weights_cap_and_mask():
    logp_old = torch.tensor([[0.0, -1.0, -2.0]], dtype=torch.float64)
    logp_rollout = torch.tensor([[-2.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    w = truncated_importance_weights(logp_old, logp_rollout, mask, cap=3.0)
    assert w.tolist() == [[3.0, 1.0, 1.0]]  # e^2 = 7.39 capped at 3; padding weight 1
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_importance_weights(logp_old, logp_rollout, mask, cap=0.0)


def test_unknown_source_and_bf16_inputs():
    logp_new, logp_rollout, adv, mask = batch()
    with pytest.raises(ValueError, match="logp_old_source"):
        rlp_policy_loss(logp_new, logp_rollout, adv, mask, 0.2, 0.2, "behaviour")
    loss, metrics = rlp_policy_loss(logp_new.bfloat16(), logp_rollout.bfloat16(), adv, mask,
                                    0.2, 0.2, "rollout", 2.0)
    assert loss.dtype == torch.float32 and metrics["logp_diff_mean"].dtype == torch.float32
