"""Keyed (counter-based) sampling: layout independence, shard slicing, distribution, top-p."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlp.rollout.sampling import (
    gumbel_from_uniform,
    keyed_uniform,
    sample_tokens,
    token_logprobs,
    top_p_mask,
)

M64 = (1 << 64) - 1


def ref_mix64(z: int) -> int:
    """splitmix64 finaliser on python ints (unsigned, explicit wrap)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_uniform(key: list[int], v: int) -> float:
    golden = 0x9E3779B97F4A7C15
    state = 0x2545F4914F6CDD1D
    for k in key:
        state = ref_mix64((state + (k + 1) * golden) & M64)
    bits = ref_mix64(state ^ ref_mix64(((v + 1) * golden) & M64))
    return ((bits >> 41) + 0.5) / 2**23


def make_keys(rows: int, seed: int = 1234, step: int = 7, thought_offset: int = 0) -> torch.Tensor:
    """Rows (seed, step, context, thought, token index) covering 4 thoughts per context."""
    r = torch.arange(rows)
    return torch.stack(
        [torch.full_like(r, seed), torch.full_like(r, step), r // 4, r % 4 + thought_offset, r % 3],
        1,
    )


def test_uniform_matches_python_reference():
    keys = torch.tensor([[0, 0, 0, 0, 0], [1234, 7, 3, 15, 2047], [-1, 2**40, 5, 1, 0]])
    got = keyed_uniform(keys, 100, 108)
    for i, key in enumerate(keys.tolist()):
        for j, v in enumerate(range(100, 108)):
            assert got[i, j].item() == ref_uniform(key, v)


def test_uniform_strictly_inside_unit_interval():
    u = keyed_uniform(make_keys(512), 0, 2048)
    assert u.dtype == torch.float32 and u.shape == (512, 2048)
    assert u.min() > 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=2e-3)
    assert u.std().item() == pytest.approx(math.sqrt(1 / 12), abs=2e-3)


def test_shard_noise_is_slice_of_full_vocab_noise():
    keys = make_keys(16)
    full = keyed_uniform(keys, 0, 1000)
    shards = [keyed_uniform(keys, lo, hi) for lo, hi in [(0, 250), (250, 500), (500, 1000)]]
    assert torch.equal(torch.cat(shards, dim=1), full)
    assert torch.equal(keyed_uniform(keys, 123, 457), full[:, 123:457])


def test_noise_independent_of_row_order_and_batch():
    keys = make_keys(64)
    full = keyed_uniform(keys, 0, 300)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keyed_uniform(keys[perm], 0, 300), full[perm])
    assert torch.equal(keyed_uniform(keys[10:13], 0, 300), full[10:13])
    assert torch.equal(keyed_uniform(keys.int(), 0, 300), full)


@pytest.mark.parametrize("column", range(5))
def test_every_key_component_changes_noise(column):
    keys = make_keys(32)
    changed = keys.clone()
    changed[:, column] += 1
    same = keyed_uniform(keys, 0, 1000) == keyed_uniform(changed, 0, 1000)
    assert same.float().mean() < 1e-3


def test_tokens_follow_keys_not_positions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=gen)
    keys = make_keys(64)
    tokens, logprobs = sample_tokens(logits, keys, 0.7, 0.9)
    perm = torch.randperm(64, generator=gen)
    tokens_p, logprobs_p = sample_tokens(logits[perm], keys[perm], 0.7, 0.9)
    assert torch.equal(tokens_p, tokens[perm]) and torch.equal(logprobs_p, logprobs[perm])
    tokens_sub, _ = sample_tokens(logits[5:9], keys[5:9], 0.7, 0.9)
    assert torch.equal(tokens_sub, tokens[5:9])
    other, _ = sample_tokens(logits, make_keys(64, thought_offset=4), 0.7, 0.9)
    assert not torch.equal(other, tokens)


def test_gumbel_hand_checked():
    # u = exp(-1): -log(1) = 0 ; u = exp(-exp(-2)): -log(exp(-2)) = 2
    # u = 0.5: -log(ln 2) = -log(0.693147) = 0.366513
    u = torch.tensor([math.exp(-1), math.exp(-math.exp(-2)), 0.5], dtype=torch.float64)
    torch.testing.assert_close(
        gumbel_from_uniform(u), torch.tensor([0.0, 2.0, 0.3665129], dtype=torch.float64)
    )


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sample_frequencies_match_softmax(temperature):
    rows = 20000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0]).expand(rows, 5)
    tokens, logprobs = sample_tokens(logits, make_keys(rows), temperature, 1.0)
    freq = torch.bincount(tokens, minlength=5).double() / rows
    probs = torch.softmax(logits[0].double() / temperature, dim=-1)
    assert (freq - probs).abs().max() < 0.01
    torch.testing.assert_close(logprobs, probs.log().float()[tokens])


def test_sample_frequencies_with_top_p_follow_nucleus():
    # probs 0.5 / 0.3 / 0.15 / 0.05, top_p 0.9: nucleus {0, 1, 2}, renormalised by 0.95
    rows = 20000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tokens, logprobs = sample_tokens(probs.log().expand(rows, 4), make_keys(rows), 1.0, 0.9)
    freq = torch.bincount(tokens, minlength=4).double() / rows
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0], dtype=torch.float64) / 0.95
    assert (freq - expected).abs().max() < 0.01 and freq[3] == 0
    # log-probs are the untruncated ones: log 0.5, log 0.3, log 0.15
    torch.testing.assert_close(logprobs, probs.log()[tokens])


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    neg = float("-inf")
    # sorted 0.5, 0.3, 0.15, 0.05 ; mass above each: 0, 0.5, 0.8, 0.95
    # top_p 0.7: keep 0.5, 0.3 (0.8 >= 0.7 drops 0.15)
    expected = torch.tensor([[neg, logits[0, 1], neg, logits[0, 3]]])
    torch.testing.assert_close(top_p_mask(logits, 0.7), expected)
    # top_p 0.9: keep 0.5, 0.3, 0.15 ; top_p 0.4: only the top token
    torch.testing.assert_close(top_p_mask(logits, 0.9), logits.masked_fill(probs == 0.05, neg))
    torch.testing.assert_close(top_p_mask(logits, 0.4), logits.masked_fill(probs != 0.5, neg))
    assert top_p_mask(logits, 1.0) is logits
    bf16 = top_p_mask(logits.bfloat16(), 0.7)
    assert bf16.dtype == torch.bfloat16 and torch.isinf(bf16).sum() == 2
    with pytest.raises(ValueError, match="top_p"):
        top_p_mask(logits, 0.0)


def test_tiny_top_p_is_greedy():
    logits = torch.randn(100, 30, generator=torch.Generator().manual_seed(2))
    tokens, _ = sample_tokens(logits, make_keys(100), 1.0, 1e-6)
    assert torch.equal(tokens, logits.argmax(-1))


def test_token_logprobs_match_reference():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=gen).bfloat16()
    tokens = torch.randint(0, 7, (2, 3), generator=gen)
    got = token_logprobs(logits, tokens, 0.7)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    values = logits.double().tolist()
    for i in range(2):
        for j in range(3):
            row = [x / 0.7 for x in values[i][j]]
            log_z = math.log(sum(math.exp(x) for x in row))
            assert got[i, j].item() == pytest.approx(row[tokens[i, j]] - log_z, abs=1e-5)


def test_errors():
    logits, keys = torch.zeros(4, 5), make_keys(4)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sample_tokens(logits, keys, temperature, 1.0)
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, torch.zeros(4, dtype=torch.long), temperature)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(logits, torch.zeros(5, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        sample_tokens(logits, make_keys(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="integer"):
        keyed_uniform(keys.float(), 0, 5)
    with pytest.raises(ValueError, match="vocab_start"):
        keyed_uniform(keys, 5, 5)
