"""objective/kl.py: the k3 KL penalty against a float64 reference written from its definition
(loops, `math`), its gradient against the closed form, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlp.objective.kl import k3_per_token, kl_penalty


def _reference(new: list[list[float]], ref: list[list[float]], mask: list[list[bool]]) -> float:
    """mean over rows of the token-mean of exp(r - n) - (r - n) - 1, in Python floats."""
    rows = []
    for n_row, r_row, m_row in zip(new, ref, mask, strict=True):
        terms = [math.exp(r - n) - (r - n) - 1 for n, r, m in zip(n_row, r_row, m_row,
                                                                   strict=True) if m]
        rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_penalty_matches_float64_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    new = -torch.rand(5, 7, generator=gen, dtype=torch.float64) * 4
    ref = new + torch.randn(5, 7, generator=gen, dtype=torch.float64) * 0.5
    mask = torch.rand(5, 7, generator=gen) < 0.6
    mask[:, 0] = True
    want = _reference(new.tolist(), ref.tolist(), mask.tolist())
    got = kl_penalty(new, ref, mask)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(want, rel=1e-12)
    # fp32 inputs: computed in fp32, close to the float64 value.
    got32 = kl_penalty(new.float(), ref.float(), mask)
    assert got32.dtype == torch.float32 and float(got32) == pytest.approx(want, rel=1e-5)
    # Garbage off the mask changes nothing.
    noisy = torch.where(mask, new, torch.full_like(new, 1e6))
    assert float(kl_penalty(noisy, ref, mask)) == pytest.approx(want, rel=1e-12)


def test_kl_penalty_gradient_closed_form():
    gen = torch.Generator().manual_seed(3)
    new = (-torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    ref = new.detach() + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.3
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    kl_penalty(new, ref, mask).backward()
    count = mask.sum(1, keepdim=True).double()
    want = torch.where(mask, (1 - torch.exp(ref - new.detach())) / count / 4, 0.0)
    torch.testing.assert_close(new.grad, want, rtol=1e-12, atol=1e-15)
    assert ref.grad is None  # the reference carries no gradient


def test_k3_is_zero_at_the_reference_and_nonnegative():
    x = torch.linspace(-3, 0, 12, dtype=torch.float64).view(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert torch.equal(k3_per_token(x, x, mask), torch.zeros(3, 4, dtype=torch.float64))
    y = x + torch.linspace(-2, 2, 12, dtype=torch.float64).view(3, 4)
    assert bool((k3_per_token(x, y, mask) >= 0).all())


def test_kl_penalty_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="differ"):
        kl_penalty(a, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="at least one token"):
        kl_penalty(a, a, mask)
