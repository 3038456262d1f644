"""Counter-based, layout-independent sampling of thought tokens.

The Gumbel noise of every (row, vocab entry) is a pure hash of the row's key tuple, e.g.
(seed, step, context, thought, token index), and of the GLOBAL vocab index. Nothing depends on
the rank, the batch position or a stateful RNG, so a rollout is bit-reproducible under any
TP/PP/DP layout, any batch composition and any row order, and a tensor-parallel shard
[vocab_start, vocab_end) draws exactly its slice of the full-vocab noise.

The hash is splitmix64's finaliser on int64 tensors. torch's `>>` on int64 is arithmetic, so
logical shifts are emulated by masking, and int64 multiplication wraps like uint64 does.
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, splitmix64's increment
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_SEED = 0x2545F4914F6CDD1D  # start state of the key chain, an arbitrary odd constant
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_UNIFORM_BITS = 23  # (k + 0.5) * 2^-23 is exact in fp32 and lies in [2^-24, 1 - 2^-24]


def _signed(value: int) -> int:
    """The int64 with the same bits as the uint64 `value`."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (uint64 semantics)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijective avalanche mix of 64-bit words held in int64."""
    z = (z ^ _shr(z, 30)) * _signed(_MUL1)
    z = (z ^ _shr(z, 27)) * _signed(_MUL2)
    return z ^ _shr(z, 31)


def keyed_uniform(keys: torch.Tensor, vocab_start: int, vocab_end: int) -> torch.Tensor:
    """Uniform noise keyed by (row key tuple, global vocab index).

    Args:
        keys: [R, K] integer key tuple of each row, e.g. (seed, step, context, thought, token).
        vocab_start: first global vocab index of this shard.
        vocab_end: one past the last global vocab index of this shard.

    Returns:
        [R, vocab_end - vocab_start] float32 in [2^-24, 1 - 2^-24], strictly inside (0, 1),
        bitwise identical on every device.
    """
    if keys.dim() != 2 or keys.dtype not in _INT_DTYPES:
        raise ValueError(f"keys must be integer [R, K], got {keys.dtype} {tuple(keys.shape)}")
    if not 0 <= vocab_start < vocab_end:
        raise ValueError(f"need 0 <= vocab_start < vocab_end, got [{vocab_start}, {vocab_end})")
    keys = keys.long()
    state = torch.full(keys.shape[:1], _signed(_SEED), dtype=torch.long, device=keys.device)
    for column in keys.unbind(dim=1):
        state = _mix64(state + (column + 1) * _signed(_GOLDEN))
    vocab = torch.arange(vocab_start, vocab_end, dtype=torch.long, device=keys.device)
    bits = _mix64(state.unsqueeze(1) ^ _mix64((vocab + 1) * _signed(_GOLDEN)))
    return (_shr(bits, 64 - _UNIFORM_BITS).float() + 0.5) * 2.0**-_UNIFORM_BITS


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms.

    Args:
        u: [...] uniforms strictly inside (0, 1).

    Returns:
        [...] `-log(-log(u))`.
    """
    return -torch.log(-torch.log(u))


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches `top_p`.

    A token is kept iff the probability mass of the tokens ranked above it is < top_p, so the
    top token always survives.

    Args:
        logits: [R, V] logits over the full vocab.
        top_p: nucleus mass in (0, 1]; >= 1 returns `logits` unchanged.

    Returns:
        [R, V] logits, -inf outside the nucleus, same dtype as the input.
    """
    if top_p <= 0:
        raise ValueError(f"top_p must be > 0, got {top_p}")
    if top_p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits.float(), dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    drop = torch.zeros_like(mass_above, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
    return logits.masked_fill(drop, float("-inf"))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def sample_tokens(
    logits: torch.Tensor, keys: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by Gumbel-max with keyed noise.

    Args:
        logits: [R, V] logits over the full vocab.
        keys: [R, K] integer key tuple of each row (see `keyed_uniform`).
        temperature: softmax temperature, > 0.
        top_p: nucleus mass; >= 1 disables the filter.

    Returns:
        tokens: [R] long, argmax of `top_p_mask(logits / T) + Gumbel(keys)`.
        logprobs: [R] float32, log_softmax(logits / T) at the chosen token (temperature-scaled,
            not renormalised over the nucleus): the behaviour log-prob `logp_old` of the
            surrogate when the policy is scored at the same temperature.
    """
    _check_temperature(temperature)
    if logits.dim() != 2 or keys.shape[:1] != logits.shape[:1]:
        raise ValueError(
            f"logits must be [R, V] and keys [R, K], got {tuple(logits.shape)}, {tuple(keys.shape)}"
        )
    scaled = logits.float() / temperature
    noise = gumbel_from_uniform(keyed_uniform(keys, 0, logits.shape[1]))
    tokens = torch.argmax(top_p_mask(scaled, top_p) + noise, dim=-1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled log-probabilities of given tokens.

    Args:
        logits: [..., V] logits.
        tokens: [...] long token ids.
        temperature: softmax temperature, > 0.

    Returns:
        [...] float32 `log_softmax(logits.float() / T)` gathered at `tokens`.
    """
    _check_temperature(temperature)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must match logits {tuple(logits.shape)} minus the vocab"
        )
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
