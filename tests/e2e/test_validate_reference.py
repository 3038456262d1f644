"""Held-out evaluation (train/validate.py) against an independent computation, before the
teacher exists (teacher = policy) and after one RLP step (teacher phi_1 = tau*theta_0 +
(1-tau)*theta_1, rebuilt from the policy's history, != the policy theta_1).

The reference takes the evaluation's contexts (uniform positions of the valid split, step key
0) and the thoughts the policy samples for them (same keys), and recomputes every log-prob
with plain full forwards (tests/helpers/step_reference.py): no document windows, left padding or KV
cache. Each metric is then a mean written out here from the definitions in validate.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.step_reference import (
    expected_prefixes,
    float_weights,
    full_logprobs,
    load_weights,
    teacher_history,
)

from megatron_rlp.models.provider import build_model, unwrap_model
from megatron_rlp.rollout.thoughts import PromptBatch, sample_thoughts
from megatron_rlp.train.rlp_step import rlp_step
from megatron_rlp.train.samplers import make_context_sampler
from megatron_rlp.train.timers import PhaseTimer
from megatron_rlp.train.validate import EVAL_STEP_KEY, eval_sampler, validate

TINY = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=64",
    "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=5",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32", "rlp.ema_decay=0.5",
    "optimizer.lr=1e-2", "train.seed=5", "device.num_threads=1", "precision.params_dtype=fp32",
    "data.split=90,10,0", "train.eval_contexts=6",
)
ATOL = 1e-5


def reference_metrics(state, policy_w, teacher_w) -> dict[str, float]:
    cfg, tok, r = state.cfg, state.tokenizer, state.cfg.rlp
    contexts = eval_sampler(state).sample(EVAL_STEP_KEY, cfg.train.eval_contexts, 1)
    docs = state.valid_corpus.documents
    record = {"doc_index": torch.tensor([c.doc_index for c in contexts]),
              "position": torch.tensor([c.position for c in contexts])}
    prefixes = expected_prefixes(record, docs, r.max_prefix_tokens)
    targets = [int(docs[c.doc_index][c.position]) for c in contexts]
    policy, teacher = (build_model(cfg, tok.vocab_size).eval() for _ in range(2))
    load_weights(policy, policy_w)
    load_weights(teacher, teacher_w)
    # The thoughts: the policy's own samples for these contexts (keys: seed, step 0, ids).
    width = max(len(p) for p in prefixes)
    tokens = torch.full((len(prefixes), width), tok.pad, dtype=torch.long)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prefixes):
        tokens[i, width - len(p):] = torch.tensor(p)
        valid[i, width - len(p):] = True
    prompts = PromptBatch(tokens, valid, valid.sum(1), torch.tensor(targets),
                          torch.arange(len(prefixes)))
    thoughts = sample_thoughts(
        unwrap_model(state.policy), prompts, group_size=r.group_size,
        max_thought_tokens=r.max_thought_tokens, temperature=r.temperature, top_p=r.top_p,
        think_start=tok.think_start, think_end=tok.think_end, pad=tok.pad,
        vocab_size=tok.vocab_size, seed=cfg.train.seed, step=EVAL_STEP_KEY)
    with torch.no_grad():
        s_teacher = torch.tensor([float(full_logprobs(teacher, p, tok.vocab_size)[-1, x])
                                  for p, x in zip(prefixes, targets, strict=True)])
        s_policy = torch.tensor([float(full_logprobs(policy, p, tok.vocab_size)[-1, x])
                                 for p, x in zip(prefixes, targets, strict=True)])
        s_think = torch.zeros(len(prefixes), r.group_size, dtype=torch.float64)
        for row in range(len(prefixes) * r.group_size):
            b, g = divmod(row, r.group_size)
            n = int(thoughts.mask[row].sum())
            seq = [*prefixes[b], tok.think_start, *thoughts.tokens[row, :n].tolist()]
            if not bool(thoughts.closed[row]):
                seq.append(tok.think_end)
            s_think[b, g] = full_logprobs(policy, seq, tok.vocab_size)[-1, targets[b]]
    s_teacher, s_policy = s_teacher.double(), s_policy.double()
    return {
        "val_nll_teacher": float(-s_teacher.mean()),
        "val_nll_policy": float(-s_policy.mean()),
        "val_nll_think": float(-s_think.mean()),
        "val_info_gain": float((s_think - s_teacher[:, None]).mean()),
        "val_closed_fraction": float(thoughts.closed.float().mean()),
        "val_contexts": float(len(prefixes)),
    }


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=ATOL), f"{key}: {got[key]} vs {value}"


def test_validation_equals_reference_before_and_after_the_teacher(state):
    policy = unwrap_model(state.policy)
    theta0 = float_weights(policy.state_dict())
    assert_close(validate(state), reference_metrics(state, theta0, theta0))

    rlp_step(state, make_context_sampler(state), PhaseTimer())
    theta1 = float_weights(policy.state_dict())
    phi1 = teacher_history([theta0, theta1], state.cfg.rlp.ema_decay)[1]
    got = validate(state)
    want = reference_metrics(state, theta1, phi1)
    assert_close(got, want)
    # The teacher is not the policy any more, by far more than the tolerance.
    assert abs(want["val_nll_teacher"] - want["val_nll_policy"]) > 100 * ATOL
    wrong = reference_metrics(state, theta1, theta1)
    assert abs(wrong["val_nll_teacher"] - got["val_nll_teacher"]) > 100 * ATOL
