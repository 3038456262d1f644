"""The shipped GPU recipes, shrunk to tiny widths, train RLP steps on the CPU in their own
precision (bf16): the dtype logic a GPU run uses (Float16Module, fp32 main weights, fp32 EMA
teacher from its own config, fp32 Mamba decode state, fp32 log-probs) runs in `make test`.

What is kept from each recipe: layer kinds (dense `*-`, hybrid `M-*`), activation, norms,
QK-norm, position embedding, tied/untied embeddings, RoPE base, optimizer, precision. What is
shrunk: widths, depth, vocabulary padding, batch, thought length, TP (1 rank). PP=2 for the
dense recipe is in tests/distributed/test_recipes_bf16_pp.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.models.mamba.inference_state import MambaState
from megatron_rlp.rollout.engine import KVCacheEngine
from megatron_rlp.rollout.thoughts import sample_thoughts_chunked
from megatron_rlp.scoring.next_token import score_next_tokens
from megatron_rlp.train.builder import build_state
from megatron_rlp.train.rlp_step import local_contexts, rlp_step
from megatron_rlp.train.samplers import make_context_sampler
from megatron_rlp.train.timers import PhaseTimer

RECIPES = {  # recipe -> a tiny layer pattern of the same kinds
    "qwen3_1p7b": "*-*-",
    "nemotron_h_8b": "M-M*-",
    "nemotron_nano_12b_v2": "M-M*-",
}


def shrunk(name: str, *extra: str):
    """The recipe's config at tiny widths on one CPU rank (its params_dtype unless `extra`
    overrides it)."""
    return load_config(f"examples/configs/{name}.yaml", (
        f"model.hybrid_layer_pattern={RECIPES[name]}", "model.hidden_size=64",
        "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.kv_channels=16", "model.mamba_num_heads=4", "model.mamba_head_dim=16",
        "model.mamba_state_dim=8", "model.mamba_num_groups=2", "model.max_sequence_length=64",
        "model.make_vocab_size_divisible_by=64", "parallel.tensor_model_parallel_size=1",
        "rlp.contexts_per_step=4", "rlp.positions_per_document=2", "rlp.group_size=3",
        "rlp.max_thought_tokens=4", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32",
        "data.corpus=data/corpus.jsonl", "data.tokenizer=byte", "data.ntp_batch_size=4",
        # The recipes' lr (1e-6) moves no bf16 weight in 2 steps; the test wants movement.
        "optimizer.lr=1e-3", "optimizer.min_lr=1e-3", "train.seed=3", "device.type=cpu",
        *extra), world_size=1)


@pytest.fixture
def initialized():
    """Initialise for the config the test passes; shut down after."""
    started = []

    def start(cfg):
        distributed.initialize(cfg)
        started.append(cfg)
        return build_state(cfg)

    yield start
    if started:
        distributed.shutdown()


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_in_bf16(initialized, name):
    cfg = shrunk(name)
    assert cfg.precision.params_dtype == "bf16"  # the recipe's own precision
    state = initialized(cfg)
    assert {p.dtype for p in state.policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in state.teacher.model.parameters()} == {torch.float32}
    assert state.teacher.model.config.params_dtype == torch.float32
    main = [p for g in state.optimizer.param_groups for p in g["params"]]
    assert main and {p.dtype for p in main} == {torch.float32}  # fp32 main weights
    before = {n: p.detach().clone() for n, p in state.policy.named_parameters()}
    sampler = make_context_sampler(state)
    rows = [rlp_step(state, sampler, PhaseTimer()) for _ in range(2)]
    for m in rows:
        assert m["skipped"] == 0.0
        for key in ("loss", "reward_mean", "s_ema", "s_pred", "grad_norm", "logp_diff_max",
                    "token_mult_prob_error"):
            assert math.isfinite(m[key]), (name, key, m)
        # Exact on-policy ratio: the update divides by its own log-probs, nothing clips.
        assert m["clip_fraction"] == 0.0 and m["is_weight_mean"] == 1.0
    # The rollout (KV-cache decode in bf16) and the update (full forward) disagree a little.
    assert 0.0 < rows[0]["logp_diff_max"] < 0.1 and rows[0]["token_mult_prob_error"] >= 1.0
    moved = [n for n, p in state.policy.named_parameters() if not torch.equal(p, before[n])]
    assert moved, f"{name}: the bf16 policy did not move"
    if "M" in RECIPES[name]:  # the Mamba decode state is fp32 under bf16 weights
        engine = KVCacheEngine(state.policy, max_batch_size=2, max_sequence_length=12)
        tokens = torch.randint(0, 200, (2, 6))
        engine.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool))
        logits = engine.step(tokens[:, -1])
        states = [e for e in engine.ctx.key_value_memory_dict.values()
                  if isinstance(e, MambaState)]
        assert len(states) == 2 and logits.dtype == torch.float32
        assert all(s.conv.dtype == s.ssm.dtype == torch.float32 for s in states)


# bf16 against fp32, step-1 rewards of the same tiny model and seed. Every reward is
# S_pred - S_ema, two log-probs z_t - logsumexp(z); a logit error of at most d moves a
# log-prob by at most 2d. bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3). On
# the way to the logits a value is rounded about 5 times in sequence (bf16 weights,
# embedding, each layer's output into the residual stream, the final norm, the output
# projection; matmuls accumulate in fp32), so the O(1) logits of this tiny model are off by
# ~5u and a log-prob by 2 * 5u = 10u ~ 0.02 nat: the bound on S_pred (bf16 policy). S_ema
# comes from the fp32 teacher holding the bf16-rounded weights (one rounding, bound halved);
# a reward is off by at most the sum. Measured: |d S_pred| 1.7e-3 (dense) and 2.7e-3
# (hybrid), |d reward| 2.3e-3 and 4.1e-3. Thoughts are compared where both runs sampled the
# same tokens (a Gumbel-max near-tie can flip a token; here all 12 agree).
LOGP_BOUND = 10 * 2.0**-9


@pytest.mark.parametrize("name", ["qwen3_1p7b", "nemotron_h_8b"])
def test_bf16_rewards_match_fp32_within_bound(initialized, name):
    runs = {}
    for dtype in ("fp32", "bf16"):
        cfg = shrunk(name, f"precision.params_dtype={dtype}")
        state = initialized(cfg)
        r, tok = cfg.rlp, state.tokenizer
        contexts, ids = local_contexts(state, make_context_sampler(state), 1)
        prompts, windows = build_rlp_inputs(contexts, ids, state.corpus, r.max_prefix_tokens,
                                            tok.pad, state.device)
        state.policy.eval()
        thoughts = sample_thoughts_chunked(
            state.policy, prompts, 0, group_size=r.group_size,
            max_thought_tokens=r.max_thought_tokens, temperature=r.temperature, top_p=r.top_p,
            think_start=tok.think_start, think_end=tok.think_end, pad=tok.pad,
            vocab_size=tok.vocab_size, seed=cfg.train.seed, step=1)
        state.teacher.initialize_from(state.policy)
        s_ema = score_next_tokens(state.teacher.model, windows.tokens, windows.valid,
                                  windows.rows, windows.cols, windows.targets, tok.vocab_size)
        runs[dtype] = (thoughts, s_ema.repeat_interleave(r.group_size))
        distributed.shutdown()
    (t32, e32), (t16, e16) = runs["fp32"], runs["bf16"]
    assert t16.logprobs.dtype == t16.s_pred.dtype == e16.dtype == torch.float32
    same = (t32.tokens == t16.tokens).all(1) & (t32.lengths == t16.lengths)
    assert same.float().mean() >= 0.5, "bf16 sampled mostly different thoughts"
    d_ema = (e32 - e16).abs().max().item()
    d_pred = (t32.s_pred - t16.s_pred)[same].abs().max().item()
    d_reward = ((t32.s_pred - e32) - (t16.s_pred - e16))[same].abs()
    print(f"{name}: max |d S_ema| {d_ema:.2e}, |d S_pred| {d_pred:.2e}, "
          f"|d reward| {d_reward.max().item():.2e}, same thoughts {int(same.sum())}/{len(same)}")
    assert d_ema <= LOGP_BOUND / 2 and d_pred <= LOGP_BOUND
    assert d_reward.max().item() <= LOGP_BOUND + LOGP_BOUND / 2
    assert d_ema > 0 and d_pred > 0  # the two runs really ran in different precisions


def test_rollout_logprobs_with_truncated_importance_weights(initialized):
    """`rlp.logp_old_source=rollout`: the bf16 rollout's log-probs are the behaviour policy;
    each token carries min(pi_update / pi_rollout, tis_cap), here within a few 1e-3 of 1
    (the rollout-vs-update disagreement), and the first update still clips nothing."""
    state = initialized(shrunk("qwen3_1p7b", "rlp.logp_old_source=rollout", "rlp.tis_cap=1.5"))
    m = rlp_step(state, make_context_sampler(state), PhaseTimer())
    assert m["skipped"] == 0.0 and m["clip_fraction"] == 0.0
    assert m["is_weight_mean"] != 1.0
    assert abs(m["is_weight_mean"] - 1.0) <= 2 * m["logp_diff_max"]
