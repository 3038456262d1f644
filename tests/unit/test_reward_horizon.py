"""`rlp.reward_tokens` (k) and `rlp.reward_discount` (gamma), scoring/horizon.py:

- the discounted sum against a float64 loop, and targets cut at the document's end;
- k = 1 through the horizon path gives the rollout's S_pred and the teacher's S_ema;
- k = 3, gamma = 0.9: the batched (left-padded) scores equal per-context, per-token forwards
  of one unpadded sequence each, summed in float64;
- the packed rollout (`rlp.share_prefixes`) and the per-context one give the same k-token
  rewards; the default k = 1 never calls the horizon path;
- bad values are one line naming the key.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlp.config import ConfigError
from megatron_rlp.scoring.horizon import discounted_sum, horizon_scores, horizon_targets
from megatron_rlp.scoring.next_token import score_next_tokens
from megatron_rlp.startup import load_config
from megatron_rlp.train import rlp_step as rlp_step_module
from megatron_rlp.train.rlp_step import rollout_and_score
from megatron_rlp.train.samplers import make_context_sampler

TINY = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=192",
    "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=4",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32", "train.seed=7",
)


def test_discounted_sum_matches_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(5, 4, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(5, 4, generator=g) > 0.3
    got = discounted_sum(logps, mask, 0.8)
    assert got.dtype == torch.float64
    for r in range(5):
        want = sum(0.8**j * float(logps[r, j]) for j in range(4) if mask[r, j])
        assert abs(float(got[r]) - want) < 1e-12
    # gamma = 1, k = 1: the plain log-prob.
    assert torch.equal(discounted_sum(logps[:, :1], torch.ones(5, 1, dtype=torch.bool), 1.0),
                       logps[:, 0])


def test_targets_are_cut_at_the_document_end():
    docs = [torch.arange(10, 20), torch.arange(30, 33)]
    targets, mask = horizon_targets(docs, [(0, 4), (1, 1)], 4)
    assert targets.tolist() == [[14, 15, 16, 17], [31, 32, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]


def _scored(state, k: int, gamma: float, share: bool = True):
    r = state.cfg.rlp
    saved = (r.reward_tokens, r.reward_discount, r.share_prefixes)
    r.reward_tokens, r.reward_discount, r.share_prefixes = k, gamma, share
    try:
        return rollout_and_score(state, make_context_sampler(state), 1)
    finally:
        r.reward_tokens, r.reward_discount, r.share_prefixes = saved


def _horizon(state, ro, k, gamma):
    tok = state.tokenizer
    state.policy.eval()
    try:
        return horizon_scores(state.policy, state.teacher.model, ro.contexts,
                              state.corpus.documents, ro.prompts, ro.thoughts, ro.lead,
                              tok.think_end, k, gamma, vocab_size=tok.vocab_size, pad=tok.pad,
                              window=state.cfg.model.max_sequence_length)
    finally:
        state.policy.train()


def test_one_token_horizon_is_the_rollout_and_teacher_score(state, monkeypatch):
    calls = []
    monkeypatch.setattr(rlp_step_module, "horizon_scores",
                        lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    ro = _scored(state, 1, 1.0)  # the default path: the horizon is never scored
    assert calls == []
    assert torch.equal(ro.rewards, ro.thoughts.s_pred - ro.s_ema.repeat_interleave(3))
    s_pred, s_ema = _horizon(state, ro, 1, 1.0)
    torch.testing.assert_close(s_pred, ro.thoughts.s_pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(s_ema, ro.s_ema, atol=1e-4, rtol=0)


def _one(model, seq: list[int], target: int, vocab: int) -> float:
    """log p(target | seq) from one unpadded forward of one sequence."""
    tokens = torch.tensor([seq])
    return float(score_next_tokens(model, tokens, torch.ones_like(tokens, dtype=torch.bool),
                                   torch.tensor([0]), torch.tensor([len(seq) - 1]),
                                   torch.tensor([target]), vocab)[0])


def test_three_token_horizon_matches_per_context_forwards(state):
    k, gamma, tok = 3, 0.9, state.tokenizer
    ro = _scored(state, k, gamma)
    docs = state.corpus.documents
    s_pred, s_ema = _horizon(state, ro, k, gamma)
    torch.testing.assert_close(ro.thoughts.s_pred, s_pred)  # what the step used
    torch.testing.assert_close(ro.rewards, s_pred - s_ema.repeat_interleave(3))
    state.policy.eval()
    for c, ctx in enumerate(ro.contexts):
        tail = [int(x) for x in docs[ctx.doc_index][ctx.position:ctx.position + k]]
        prefix = [int(x) for x in ctx.prefix]
        want = sum(gamma**j * _one(state.teacher.model, prefix + tail[:j], tail[j],
                                   tok.vocab_size) for j in range(len(tail)))
        assert abs(float(s_ema[c]) - want) < 1e-4
        prompt = ro.prompts.tokens[c][ro.prompts.valid[c]].tolist()
        for g in range(3):
            row = c * 3 + g
            th = ro.thoughts.tokens[row][ro.thoughts.mask[row]].tolist()
            seq = prompt + list(ro.lead) + th + ([] if ro.thoughts.closed[row] else
                                                 [tok.think_end])
            want = sum(gamma**j * _one(state.policy, seq + tail[:j], tail[j], tok.vocab_size)
                       for j in range(len(tail)))
            assert abs(float(s_pred[row]) - want) < 1e-4
    state.policy.train()
    assert float(s_ema.abs().min()) > 0


def test_packed_and_per_context_rollouts_give_the_same_horizon_rewards(state):
    packed = _scored(state, 3, 0.9, share=True)
    plain = _scored(state, 3, 0.9, share=False)
    assert torch.equal(packed.thoughts.tokens, plain.thoughts.tokens)
    torch.testing.assert_close(packed.rewards, plain.rewards, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.advantages, plain.advantages, atol=1e-3, rtol=0)


@pytest.mark.parametrize("override,needle", [
    ("rlp.reward_tokens=0", "rlp.reward_tokens=0 (allowed: an integer >= 1"),
    ("rlp.reward_discount=0", "rlp.reward_discount=0"),
    ("rlp.reward_discount=1.5", "rlp.reward_discount=1.5 (allowed: in (0, 1])"),
])
def test_bad_horizon_values_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("examples/configs/tiny_cpu.yaml", (override,), world_size=1)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unscored_steps_keep_the_horizon_s_pred(state):
    """`rlp.teacher_scoring=off`: no S_ema, the rewards are the k-token S_pred alone (the
    same group advantages: S_ema is one constant per context)."""
    scored = _scored(state, 3, 0.9)
    r = state.cfg.rlp
    saved, r.teacher_scoring = r.teacher_scoring, "off"
    try:
        unscored = _scored(state, 3, 0.9)
    finally:
        r.teacher_scoring = saved
    assert unscored.s_ema is None
    torch.testing.assert_close(unscored.rewards, scored.thoughts.s_pred)
    torch.testing.assert_close(unscored.advantages, scored.advantages, atol=1e-4, rtol=0)
