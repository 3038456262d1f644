"""RLP objective (reward, group advantage, clipped surrogate) against float64 loop references."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlp.objective import (
    clip_fraction,
    clipped_surrogate_loss,
    group_advantages,
    info_gain_reward,
)


def ref_advantages(rewards: list[list[float]]) -> list[list[float]]:
    out = []
    for row in rewards:
        g = len(row)
        mean = sum(row) / g
        out.append([g / (g - 1) * (r - mean) for r in row])
    return out


def ref_terms(logp_new, logp_old, adv, mask, eps_low, eps_high):
    """Per masked token: (row, -min(rho*A, clip(rho)*A), clip active), in float64 python."""
    out = []
    for i in range(len(logp_new)):
        for t in range(len(logp_new[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp_new[i][t] - logp_old[i][t])
            clipped_rho = min(max(rho, 1.0 - eps_low), 1.0 + eps_high)
            unclipped, clipped = rho * adv[i], clipped_rho * adv[i]
            out.append((i, -min(unclipped, clipped), unclipped > clipped))
    return out


def ref_loss(logp_new, logp_old, adv, mask, eps_low, eps_high) -> float:
    terms = ref_terms(logp_new, logp_old, adv, mask, eps_low, eps_high)
    rows = []
    for i in range(len(logp_new)):
        row = [term for r, term, _ in terms if r == i]
        rows.append(sum(row) / len(row))
    return sum(rows) / len(rows)


def ref_clip_fraction(logp_new, logp_old, adv, mask, eps_low, eps_high) -> float:
    terms = ref_terms(logp_new, logp_old, adv, mask, eps_low, eps_high)
    return sum(active for _, _, active in terms) / len(terms)


def random_batch(n: int = 7, t: int = 11, seed: int = 0):
    """Log-ratios in [-2, 2] (rho from 0.14 to 7.4), advantages of both signs, ragged masks."""
    gen = torch.Generator().manual_seed(seed)
    logp_old = -3 * torch.rand(n, t, generator=gen, dtype=torch.float64)
    logp_new = logp_old + 4 * torch.rand(n, t, generator=gen, dtype=torch.float64) - 2
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    adv[0], adv[1] = 1.5, -1.5
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    starts = torch.randint(0, t, (n,), generator=gen)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        start = min(int(starts[i]), t - int(lengths[i]))
        mask[i, start : start + int(lengths[i])] = True
    mask[2] = False
    mask[2, t - 1] = True  # a one-token thought
    return logp_new, logp_old, adv, mask


# ---------------------------------------------------------------- reward


def test_reward_hand_checked():
    logp_pred = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    logp_ema = torch.tensor([[-3.0, -1.5]])
    reward = info_gain_reward(logp_pred, logp_ema)
    # -1 - (-3) = 2 ; -2 - (-1.5) = -0.5
    torch.testing.assert_close(reward, torch.tensor([[2.0, -0.5]]), rtol=0, atol=0)
    assert not reward.requires_grad


def test_reward_bf16_policy_fp32_teacher_gives_fp32():
    reward = info_gain_reward(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([-1.001]))
    assert reward.dtype == torch.float32
    torch.testing.assert_close(reward, torch.tensor([0.001]), rtol=1e-3, atol=0)


def test_reward_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        info_gain_reward(torch.zeros(2, 4), torch.zeros(2, 1))


# ---------------------------------------------------------------- advantages


def test_advantages_hand_checked():
    # mean = 12/4 = 3, G/(G-1) = 4/3: (1-3)*4/3 = -8/3, (2-3)*4/3 = -4/3, 0, (6-3)*4/3 = 4
    got = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    torch.testing.assert_close(got, torch.tensor([[-8 / 3, -4 / 3, 0.0, 4.0]]))
    # G=2: mean 0.5, G/(G-1) = 2: [-1, 1]
    torch.testing.assert_close(
        group_advantages(torch.tensor([[0.0, 1.0]])), torch.tensor([[-1.0, 1.0]])
    )


def test_advantages_match_reference_and_leave_one_out():
    rewards = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rewards.requires_grad_()
    got = group_advantages(rewards)
    assert not got.requires_grad
    expected = torch.tensor(ref_advantages(rewards.tolist()), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    g = rewards.shape[1]
    leave_one_out = rewards - (rewards.sum(1, keepdim=True) - rewards) / (g - 1)
    torch.testing.assert_close(got, leave_one_out.detach(), rtol=1e-12, atol=1e-12)


def test_advantages_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.zeros(2, 4, 1))


# ---------------------------------------------------------------- surrogate


def hand_case(dtype=torch.float32):
    # row 0: rho = [1.5, 0.5, 1.0], A = +1 ; row 1: rho = [1.5, 0.5, (pad)], A = -2
    rho = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]], dtype=torch.float64)
    logp_old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp_new = (logp_old + rho.log()).to(dtype)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logp_new, logp_old.to(dtype), torch.tensor([1.0, -2.0], dtype=dtype), mask


def test_surrogate_hand_checked():
    # eps_low = 0.2, eps_high = 0.3: clip range [0.8, 1.3]
    # row 0 (A=+1): min(1.5, 1.3)=1.3 ; min(0.5, 0.8)=0.5 ; min(1, 1)=1 -> mean 2.8/3, L0 = -14/15
    # row 1 (A=-2): min(-3, -2.6)=-3 ; min(-1, -1.6)=-1.6 -> mean -2.3, L1 = +2.3
    # loss = (-14/15 + 2.3) / 2 = (-28/30 + 69/30) / 2 = 41/60
    loss = clipped_surrogate_loss(*hand_case(), eps_low=0.2, eps_high=0.3)
    torch.testing.assert_close(loss, torch.tensor(41 / 60))
    # clip active (rho*A > clip(rho)*A): row 0 token 0 (1.5 > 1.3), row 1 token 1 (-1 > -1.6)
    # -> 2 of 5 masked tokens
    frac = clip_fraction(*hand_case(), eps_low=0.2, eps_high=0.3)
    torch.testing.assert_close(frac, torch.tensor(0.4))


def test_surrogate_single_token_hand_checked():
    # rho = 1.5, A = +1, eps 0.2: min(1.5, 1.2) = 1.2 -> loss -1.2
    logp_new = torch.tensor([[math.log(1.5)]])
    loss = clipped_surrogate_loss(
        logp_new, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 0.2, 0.2
    )
    torch.testing.assert_close(loss, torch.tensor(-1.2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28), (0.0, 0.0)])
def test_surrogate_matches_reference(seed, eps):
    logp_new, logp_old, adv, mask = random_batch(seed=seed)
    lists = (logp_new.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist())
    loss = clipped_surrogate_loss(logp_new, logp_old, adv, mask, *eps)
    torch.testing.assert_close(
        loss.double(), torch.tensor(ref_loss(*lists, *eps), dtype=torch.float64)
    )
    frac = clip_fraction(logp_new, logp_old, adv, mask, *eps)
    assert frac.dtype == torch.float32 and frac.dim() == 0
    assert frac.item() == pytest.approx(ref_clip_fraction(*lists, *eps), abs=1e-7)


def test_surrogate_float_mask_equals_bool_mask():
    logp_new, logp_old, adv, mask = random_batch()
    args = (logp_new, logp_old, adv)
    assert clipped_surrogate_loss(*args, mask, 0.2, 0.2) == clipped_surrogate_loss(
        *args, mask.float(), 0.2, 0.2
    )


def test_surrogate_bf16_inputs_computed_in_fp32():
    logp_new, logp_old, adv, mask = random_batch()
    new16 = logp_new.bfloat16().requires_grad_()
    old16, adv16 = logp_old.bfloat16(), adv.bfloat16()
    loss = clipped_surrogate_loss(new16, old16, adv16, mask, 0.2, 0.28)
    assert loss.dtype == torch.float32
    lists = (
        new16.double().tolist(),
        old16.double().tolist(),
        adv16.double().tolist(),
        mask.tolist(),
    )
    assert loss.item() == pytest.approx(ref_loss(*lists, 0.2, 0.28), rel=1e-5, abs=1e-6)
    loss.backward()
    assert new16.grad.dtype == torch.bfloat16


def test_surrogate_ignores_garbage_padding():
    logp_new, logp_old, adv, mask = random_batch()
    padded_new = logp_new.masked_fill(~mask, float("-inf")).requires_grad_()
    padded_old = logp_old.masked_fill(~mask, float("nan"))
    loss = clipped_surrogate_loss(padded_new, padded_old, adv, mask, 0.2, 0.2)
    torch.testing.assert_close(
        loss, clipped_surrogate_loss(logp_new, logp_old, adv, mask, 0.2, 0.2)
    )
    loss.backward()
    assert torch.isfinite(padded_new.grad).all()
    assert (padded_new.grad[~mask] == 0).all()


def test_surrogate_gradient_at_rho_one():
    # rho = 1: d loss / d logp_new[i, u] = -A_i / (N * |c_i|) on thought tokens, 0 on padding
    _, logp_old, adv, mask = random_batch()
    logp_new = logp_old.clone().requires_grad_()
    clipped_surrogate_loss(logp_new, logp_old, adv, mask, 0.2, 0.2).backward()
    n, lengths = mask.shape[0], mask.sum(1, keepdim=True)
    expected = torch.where(mask, -adv.unsqueeze(1) / (n * lengths), 0.0)
    torch.testing.assert_close(logp_new.grad, expected, rtol=1e-12, atol=1e-15)


def test_surrogate_gradient_zero_where_clipped():
    # unclipped token: d(-rho*A/(N|c|))/d logp_new = -rho*A/(N|c|) ; clipped token: 0
    logp_new, logp_old, adv, mask = random_batch(seed=3)
    logp_new.requires_grad_()
    logp_old.requires_grad_()
    adv.requires_grad_()
    clipped_surrogate_loss(logp_new, logp_old, adv, mask, 0.2, 0.28).backward()
    n, lengths = mask.shape[0], mask.sum(1, keepdim=True)
    rho = (logp_new - logp_old).exp().detach()
    a = adv.detach().unsqueeze(1)
    active = rho * a > rho.clamp(0.8, 1.28) * a
    assert active[mask].any() and (~active[mask]).any()
    expected = torch.where(mask & ~active, -rho * a / (n * lengths), 0.0)
    torch.testing.assert_close(logp_new.grad, expected, rtol=1e-12, atol=1e-15)
    assert logp_old.grad is None and adv.grad is None


def test_surrogate_errors():
    logp, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"empty mask in rows \[1\]"):
        clipped_surrogate_loss(logp, logp, adv, empty, 0.2, 0.2)
    with pytest.raises(ValueError, match="empty mask"):
        clip_fraction(logp, logp, adv, empty.float(), 0.2, 0.2)
    with pytest.raises(ValueError, match="same"):
        clipped_surrogate_loss(logp, torch.zeros(2, 4), adv, mask, 0.2, 0.2)
    with pytest.raises(ValueError, match="same"):
        clipped_surrogate_loss(logp, logp, adv, mask[:, :2], 0.2, 0.2)
    with pytest.raises(ValueError, match=r"\[N\]"):
        clipped_surrogate_loss(logp, logp, torch.zeros(2, 1), mask, 0.2, 0.2)
    with pytest.raises(ValueError, match=r"\[N\]"):
        clipped_surrogate_loss(logp, logp, torch.zeros(3), mask, 0.2, 0.2)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        clipped_surrogate_loss(torch.zeros(6), torch.zeros(6), adv, torch.ones(6), 0.2, 0.2)
    with pytest.raises(ValueError, match="clip"):
        clipped_surrogate_loss(logp, logp, adv, mask, -0.1, 0.2)
