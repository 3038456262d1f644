"""models/masked_attention.py: explicit boolean masks computed with SDPA in Megatron's
core-attention layout, for Transformer Engine core attention (which ignores a mask given
with `causal`/`no_mask`). TE is not installed here: the math is checked against a float64
reference of Megatron's masked softmax, and the routing on Megatron's local core attention
(`only_transformer_engine=False`) against the unrouted model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny_models import tiny_model

from megatron_rlp.models.masked_attention import (
    MASKED_SCORE,
    route_explicit_masks,
    sdpa_with_mask,
)
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.packing.tree import tree_mask


def _reference(query, key, value, mask, scale):
    """Megatron's DotProductAttention semantics in float64: fill masked scores with -10000,
    softmax, weight the values; GQA by repeating each key/value group."""
    sq, b, heads, hn = query.shape
    rep = heads // key.shape[2]
    q = query.double().permute(1, 2, 0, 3)
    k = key.double().repeat_interleave(rep, 2).permute(1, 2, 0, 3)
    v = value.double().repeat_interleave(rep, 2).permute(1, 2, 0, 3)
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(mask, MASKED_SCORE), -1)
    return (probs @ v).permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def _left_padded_valid(lengths, width):
    cols = torch.arange(width)
    return cols[None] >= (width - torch.tensor(lengths))[:, None]


@pytest.mark.parametrize("kind", ["padded-causal", "decode", "tree"])
def test_sdpa_with_mask_matches_megatron_semantics(kind):
    gen = torch.Generator().manual_seed(0)
    b, heads, groups, hn = 3, 4, 2, 8
    if kind == "padded-causal":  # left-padded prompts, fully masked padding rows included
        s = sk = 7
        mask = padded_causal_mask(_left_padded_valid([7, 4, 1], s))
    elif kind == "decode":  # one query per row against a cache with invalid columns
        s, sk = 1, 9
        mask = ~_left_padded_valid([9, 5, 2], sk)[:, None, None, :]
    else:  # the packed update's tree: a window of 4 then two 3-token branches
        branch = torch.tensor([[-1] * 4 + [0] * 3 + [1] * 3] * b)
        lo = torch.zeros_like(branch)
        hi = torch.tensor([[0, 0, 0, 0] + [3] * 3 + [4] * 3] * b)
        mask = tree_mask(branch, lo, hi)
        s = sk = branch.shape[1]
    q = torch.randn(s, b, heads, hn, generator=gen)
    k, v = (torch.randn(sk, b, groups, hn, generator=gen) for _ in range(2))
    scale = 1 / math.sqrt(hn)
    got = sdpa_with_mask(q, k, v, mask, scale)
    want = _reference(q, k, v, mask, scale)
    assert got.shape == (s, b, heads * hn)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_routed_model_equals_megatron_local_attention_with_masks():
    """A padded forward of the tiny model: routed through SDPA == Megatron's own masked
    softmax; a mask-free forward goes through the original module untouched."""
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(3, 12)
    mask = padded_causal_mask(_left_padded_valid([12, 8, 3], 12))
    with tiny_model(50) as model, torch.no_grad():
        model.eval()
        want, plain = model(tokens, positions, mask), model(tokens, positions, None)
        assert route_explicit_masks(model) == 0  # no TE core attention in the local spec
        assert route_explicit_masks(model, only_transformer_engine=False) == 2
        assert route_explicit_masks(model, only_transformer_engine=False) == 2  # idempotent
        got = model(tokens, positions, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(tokens, positions, None), plain)
