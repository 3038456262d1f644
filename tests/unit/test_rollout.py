"""KV-cache decoding and thought rollouts on a tiny HybridModel, against plain full forwards.

One-process gloo group, fp32. Every cached quantity (prefill/step logits, sampling log-probs,
S_pred) is recomputed from scratch with `model(ids[None], arange(n)[None], None)` over the
unpadded row sequence, so left padding, forking and the decode mask are all checked.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import tiny_dense_model

from megatron_rlp.rollout import thoughts as thoughts_module
from megatron_rlp.rollout.engine import KVCacheEngine
from megatron_rlp.rollout.sampling import sample_tokens, token_logprobs
from megatron_rlp.rollout.thoughts import PromptBatch, sample_thoughts, sample_thoughts_chunked
from megatron_rlp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
VOCAB = TOK.vocab_size  # 261; the model pads its vocabulary to 320
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    with tiny_dense_model(VOCAB) as net:
        yield net.eval()


def full_logits(model, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """[n, V] fp32 logits of a plain causal forward over one unpadded sequence."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        out = model(ids[None], torch.arange(len(ids))[None], None)
    return out[0].float()


def make_prompts(lengths, context_ids, seed=0) -> tuple[PromptBatch, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    return left_pad(rows, context_ids, seed), rows


def left_pad(rows: list[list[int]], context_ids, seed=0) -> PromptBatch:
    p = max(len(r) for r in rows)
    tokens = torch.full((len(rows), p), TOK.pad, dtype=torch.long)
    valid = torch.zeros(len(rows), p, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):] = torch.tensor(r)
        valid[i, p - len(r):] = True
    targets = torch.tensor([(sum(r) + 31 * seed) % 256 for r in rows])  # a function of the row
    return PromptBatch(tokens=tokens, valid=valid, lengths=valid.sum(1), targets=targets,
                       context_ids=torch.as_tensor(context_ids, dtype=torch.long))


def rollout(model, prompts, *, group_size=3, max_thought_tokens=3, temperature=0.7,
            top_p=1.0, seed=1234, step=0, compact_below=0.5, check_every=1):
    return sample_thoughts(
        model, prompts, group_size=group_size, max_thought_tokens=max_thought_tokens,
        temperature=temperature, top_p=top_p, think_start=TOK.think_start,
        think_end=TOK.think_end, pad=TOK.pad, vocab_size=VOCAB, seed=seed, step=step,
        compact_below=compact_below, check_every=check_every,
    )


# --------------------------------------------------------------------------------------
# KV-cache engine


def test_decode_equals_full_forward(model):
    prompts, rows = make_prompts([5, 9, 1, 7], [0, 1, 2, 3])
    b, g, steps = len(rows), 2, 4
    engine = KVCacheEngine(model, max_batch_size=b * g,
                           max_sequence_length=prompts.tokens.shape[1] + steps)
    logits = engine.prefill(prompts.tokens, prompts.valid)
    assert logits.shape == (b, 320) and logits.dtype == torch.float32
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i], full_logits(model, r)[-1], atol=ATOL, rtol=0)

    engine.fork(g)
    seqs = [list(rows[i // g]) for i in range(b * g)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        new = torch.randint(0, VOCAB, (b * g,), generator=gen)
        new[1::g] = new[0::g]  # sibling branches of some rows see identical tokens ...
        new[g * 2 + 1] = (new[g * 2] + 1) % VOCAB  # ... and differ for others
        logits = engine.step(new)
        assert logits.shape == (b * g, 320)
        for i in range(b * g):
            seqs[i].append(int(new[i]))
            torch.testing.assert_close(logits[i], full_logits(model, seqs[i])[-1],
                                       atol=ATOL, rtol=0)


def test_prefill_resets_between_batches(model):
    """A second prefill on the same engine forgets the first batch (cache reset)."""
    a, rows_a = make_prompts([6, 3], [0, 1], seed=1)
    b, rows_b = make_prompts([4, 8, 2], [0, 1, 2], seed=2)
    engine = KVCacheEngine(model, max_batch_size=3, max_sequence_length=10)
    engine.prefill(a.tokens, a.valid)
    engine.step(torch.tensor([1, 2]))
    logits = engine.prefill(b.tokens, b.valid)
    logits = engine.step(torch.tensor([5, 6, 7]))
    for i, r in enumerate(rows_b):
        torch.testing.assert_close(logits[i], full_logits(model, r + [5 + i])[-1],
                                   atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------
# Thought rollouts


def check_thoughts(model, prompts: PromptBatch, rows: list[list[int]], out, group_size,
                   max_thought_tokens, temperature=0.7):
    """Structure, then log-probs and S_pred against full forwards, row by row."""
    r_total, n = len(rows) * group_size, max_thought_tokens
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (r_total, n)
    assert out.lengths.shape == out.closed.shape == out.s_pred.shape == (r_total,)
    assert out.tokens.dtype == torch.long and out.mask.dtype == torch.bool
    assert out.logprobs.dtype == out.s_pred.dtype == torch.float32

    positions = torch.arange(n)
    assert torch.equal(out.mask, positions[None] < out.lengths[:, None])  # prefix mask
    assert torch.equal(out.lengths, out.mask.sum(1))
    assert bool((out.lengths >= 1).all())
    assert bool((out.tokens[~out.mask] == TOK.pad).all())
    assert bool((out.logprobs[~out.mask] == 0).all())
    assert bool((out.tokens[out.mask] < VOCAB).all())  # padded vocabulary never sampled
    assert bool((out.logprobs[out.mask] <= 0).all())
    assert bool(torch.isfinite(out.s_pred).all())

    for r in range(r_total):
        b = r // group_size
        length, closed = int(out.lengths[r]), bool(out.closed[r])
        thought = out.tokens[r, :length].tolist()
        if closed:
            assert thought[-1] == TOK.think_end and TOK.think_end not in thought[:-1]
        else:
            assert length == n and TOK.think_end not in thought
        head = rows[b] + [TOK.think_start]
        # log pi_old of every thought token: one forward over prefix + <think> + thought.
        logits = full_logits(model, head + thought)[len(head) - 1:len(head) - 1 + length]
        want = token_logprobs(logits[:, :VOCAB], torch.tensor(thought), temperature)
        torch.testing.assert_close(out.logprobs[r, :length], want, atol=ATOL, rtol=0)
        # S_pred: the real next token after `</think>` (sampled or forced), temperature 1.
        closing = [] if closed else [TOK.think_end]
        last = full_logits(model, head + thought + closing)[-1]
        want = torch.log_softmax(last[:VOCAB], -1)[prompts.targets[b]]
        torch.testing.assert_close(out.s_pred[r], want, atol=ATOL, rtol=0)


def test_sample_thoughts_force_closed(model):
    prompts, rows = make_prompts([5, 9, 2], [10, 11, 12])
    out = rollout(model, prompts, group_size=3, max_thought_tokens=3)
    assert not bool(out.closed.any())  # a random model essentially never says `</think>`
    check_thoughts(model, prompts, rows, out, 3, 3)


def forcing_sample_tokens(close_at: dict[int, int]):
    """`sample_vocab_parallel`, except thought g emits `</think>` at token index close_at[g].

    The forced token's log-prob is the honest one under the (masked) sampling logits.
    """

    def sample(logits, keys, temperature, top_p, vocab_size):
        logits = logits.float().clone()
        logits[:, vocab_size:] = float("-inf")
        tok, lp = sample_tokens(logits, keys, temperature, top_p)
        force = torch.tensor([close_at.get(int(g), -1) == int(k) for g, k in keys[:, 3:5]])
        tok = torch.where(force, TOK.think_end, tok)
        tok = torch.where(~force & (tok == TOK.think_end), 0, tok)  # no accidental closes
        return tok, token_logprobs(logits, tok, temperature)

    return sample


def test_sample_thoughts_closed_and_force_closed(model, monkeypatch):
    monkeypatch.setattr(thoughts_module, "sample_vocab_parallel",
                        forcing_sample_tokens({0: 0, 1: 3}))
    prompts, rows = make_prompts([4, 7], [5, 6], seed=3)
    out = rollout(model, prompts, group_size=3, max_thought_tokens=4)
    assert out.closed.tolist() == [True, True, False] * 2
    assert out.lengths.tolist() == [1, 4, 4] * 2  # thought 1 closes in the last slot
    check_thoughts(model, prompts, rows, out, 3, 4)


def test_sample_thoughts_all_closed_early(model, monkeypatch):
    monkeypatch.setattr(thoughts_module, "sample_vocab_parallel",
                        forcing_sample_tokens({0: 1, 1: 1}))
    prompts, rows = make_prompts([3, 6, 5], [0, 1, 2], seed=4)
    out = rollout(model, prompts, group_size=2, max_thought_tokens=5)
    assert bool(out.closed.all()) and out.lengths.tolist() == [2] * 6
    check_thoughts(model, prompts, rows, out, 2, 5)


def test_sample_thoughts_top_p_and_temperature(model):
    prompts, rows = make_prompts([6, 3], [0, 1], seed=5)
    out = rollout(model, prompts, group_size=2, max_thought_tokens=3, temperature=1.3,
                  top_p=0.5)
    check_thoughts(model, prompts, rows, out, 2, 3, temperature=1.3)


def test_thoughts_are_layout_independent(model):
    # Different lengths, so both batches pad differently: [A, B, C] vs [C, A].
    _, (a, b, c) = make_prompts([4, 9, 6], [0, 1, 2], seed=6)
    abc = left_pad([a, b, c], [100, 101, 102])  # targets follow the prompt, not the batch
    ca = left_pad([c, a], [102, 100])
    g = 3
    out_abc = rollout(model, abc, group_size=g, max_thought_tokens=4)
    out_ca = rollout(model, ca, group_size=g, max_thought_tokens=4)
    for i_abc, i_ca in ((2, 0), (0, 1)):
        s_abc, s_ca = slice(i_abc * g, i_abc * g + g), slice(i_ca * g, i_ca * g + g)
        assert torch.equal(out_abc.tokens[s_abc], out_ca.tokens[s_ca])
        assert torch.equal(out_abc.lengths[s_abc], out_ca.lengths[s_ca])
        torch.testing.assert_close(out_abc.logprobs[s_abc], out_ca.logprobs[s_ca],
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(out_abc.s_pred[s_abc], out_ca.s_pred[s_ca],
                                   atol=ATOL, rtol=0)
    # The G thoughts of one context differ from each other ...
    assert len({tuple(t) for t in out_abc.tokens[:g].tolist()}) == g
    # ... and the key, not the batch, decides them: new step or seed, new thoughts.
    again = rollout(model, abc, group_size=g, max_thought_tokens=4)
    assert torch.equal(again.tokens, out_abc.tokens)
    assert not torch.equal(rollout(model, abc, group_size=g, max_thought_tokens=4,
                                   step=1).tokens, out_abc.tokens)
    assert not torch.equal(rollout(model, abc, group_size=g, max_thought_tokens=4,
                                   seed=99).tokens, out_abc.tokens)
    # Context ids are part of the key: same prompts under other ids sample differently.
    other = left_pad([a, b, c], [7, 8, 9])
    assert not torch.equal(rollout(model, other, group_size=g, max_thought_tokens=4).tokens,
                           out_abc.tokens)


def test_chunked_rollout_equals_one_batch(model):
    """Rollout chunks bound the cache; keyed sampling makes them invisible in the result."""
    prompts, _ = make_prompts([4, 9, 6, 2, 7], [0, 1, 2, 3, 4], seed=8)
    kwargs = dict(group_size=2, temperature=0.7, top_p=1.0, think_start=TOK.think_start,
                  think_end=TOK.think_end, vocab_size=VOCAB, seed=1234, step=3)
    whole = sample_thoughts_chunked(model, prompts, 0, 4, TOK.pad, **kwargs)
    chunked = sample_thoughts_chunked(model, prompts, 2, 4, TOK.pad, **kwargs)
    assert torch.equal(whole.tokens, chunked.tokens) and torch.equal(whole.mask, chunked.mask)
    torch.testing.assert_close(whole.logprobs, chunked.logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(whole.s_pred, chunked.s_pred, atol=ATOL, rtol=0)


def test_finished_thoughts_leave_the_batch(model, monkeypatch):
    """Once at most half the rows still think, the finished ones are dropped from the cache
    and the decode batch; the thoughts, log-probs and S_pred stay what the full batch gives
    (and what full forwards give)."""
    monkeypatch.setattr(thoughts_module, "sample_vocab_parallel",
                        forcing_sample_tokens({0: 0, 1: 0, 2: 2}))
    kept = []
    keep = KVCacheEngine.keep
    monkeypatch.setattr(KVCacheEngine, "keep",
                        lambda self, rows: (kept.append(len(rows)), keep(self, rows))[1])
    prompts, rows = make_prompts([5, 3, 8], [7, 8, 9], seed=9)
    compacted = rollout(model, prompts, group_size=4, max_thought_tokens=5)
    assert kept == [6, 3]  # 12 rows -> the 6 still thinking -> the 3 past `</think>` at 2
    check_thoughts(model, prompts, rows, compacted, 4, 5)
    kept.clear()
    full = rollout(model, prompts, group_size=4, max_thought_tokens=5, compact_below=0.0)
    assert kept == []
    assert torch.equal(full.tokens, compacted.tokens) and torch.equal(full.mask, compacted.mask)
    assert torch.equal(full.closed, compacted.closed)
    torch.testing.assert_close(compacted.logprobs, full.logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(compacted.s_pred, full.s_pred, atol=ATOL, rtol=0)
    # Looking at the open thoughts only every 3rd step (fewer host syncs) compacts later
    # (12 rows -> 3 at step 3) and decodes finished rows on: the same thoughts.
    kept.clear()
    sparse = rollout(model, prompts, group_size=4, max_thought_tokens=5, check_every=3)
    assert kept == [3]
    assert torch.equal(sparse.tokens, full.tokens) and torch.equal(sparse.closed, full.closed)
    torch.testing.assert_close(sparse.logprobs, full.logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(sparse.s_pred, full.s_pred, atol=ATOL, rtol=0)
