"""Held-out evaluation: next-token loss on the valid split without and with thinking.

RLP's claim is that a thought makes the real next token more likely. On `train.eval_contexts`
contexts of the valid split (`data.split`), this measures:

    val_nll_teacher  -log pbar_phi(x_t | x_<t)        the EMA teacher, no thought (the
                                                       policy for NTP runs, which have none)
    val_nll_policy   -log p_theta(x_t | x_<t)          the policy, no thought
    val_nll_think    -log p_theta(x_t | x_<t, c)       the policy after one of its sampled
                                                       thoughts c (mean over G thoughts)
    val_info_gain    mean of log p_theta(x_t | x_<t, c) - log pbar_phi(x_t | x_<t): the RLP
                     reward on held-out text (positive: thinking helps)
    val_closed_fraction  thoughts the policy closed itself

The contexts are drawn with step key 0 (which training never uses) at positions chosen by
`train.eval_position_strategy` (uniform by default, stride, entropy: the teacher's
highest-entropy positions, one per document, or answer: the answers' first tokens of a task
corpus, `data/answer_positions.py`), and the sampling keys of the thoughts are
fixed too: with uniform or stride positions successive evaluations differ only by the
weights (entropy positions follow the teacher as it moves). The policy thinks in the
training format (`rlp.thought_template`); the teacher and the no-thought policy score raw
x_<t. Works under any DP/TP/PP layout the rollouts support
(contexts are split over data-parallel ranks; metrics are global).
"""

from __future__ import annotations

import torch

from megatron_rlp.data import ContextSampler
from megatron_rlp.data.answer_positions import AnswerPositionSampler
from megatron_rlp.data.batches import build_rlp_inputs
from megatron_rlp.models.fp8 import rollout_precision
from megatron_rlp.rollout.template import apply_template, build_template
from megatron_rlp.rollout.thoughts import sample_thoughts
from megatron_rlp.scoring.next_token import score_next_tokens
from megatron_rlp.train.builder import TrainState
from megatron_rlp.train.reduce import gather_data_parallel
from megatron_rlp.train.samplers import entropy_scorer, thought_markers

EVAL_STEP_KEY = 0  # training steps are numbered from 1


def eval_sampler(state: TrainState) -> ContextSampler:
    """Positions over the valid split by `train.eval_position_strategy` (independent of the
    training strategy, `rlp.position_strategy`)."""
    r, strategy = state.cfg.rlp, state.cfg.train.eval_position_strategy
    if state.valid_corpus is None:
        raise ValueError(f"validation needs a valid split (data.split={state.cfg.data.split!r})")
    if strategy == "answer":
        return AnswerPositionSampler(state.valid_corpus, r.min_prefix_tokens,
                                     r.max_prefix_tokens, state.cfg.train.seed,
                                     state.tokenizer.think_end)
    scorer = None
    if strategy == "entropy":
        scorer = entropy_scorer(state)  # under rollout_precision, like the sampling below
    return ContextSampler(state.valid_corpus, min_prefix=r.min_prefix_tokens,
                          max_prefix=r.max_prefix_tokens, seed=state.cfg.train.seed,
                          strategy=strategy, stride=r.position_stride, scorer=scorer,
                          skip_spans=thought_markers(state) if r.skip_thought_spans else None)


@torch.no_grad()
def validate(state: TrainState, sampler: ContextSampler | None = None) -> dict[str, float]:
    """Evaluate the current policy and teacher; every rank returns the same global metrics.

    Args:
        state: The run; `state.valid_corpus` must exist.
        sampler: Reuse a sampler from `eval_sampler(state)` (optional; cheap to rebuild).
    """
    from megatron.core import parallel_state

    cfg, tok = state.cfg, state.tokenizer
    r, n = cfg.rlp, cfg.train.eval_contexts
    sampler = sampler or eval_sampler(state)
    contexts = sampler.sample(EVAL_STEP_KEY, n, 1)
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    per_rank = n // dp
    ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    prompts, windows = build_rlp_inputs([contexts[i] for i in ids], ids, state.valid_corpus,
                                        r.max_prefix_tokens, tok.pad, state.device)
    template = build_template(r.thought_template, tok)
    policy_prompts, _ = apply_template(template, prompts, windows, tok.pad)
    policy = state.policy
    was_training = policy.training
    policy.eval()
    try:
        # Under FP8 training, scored and sampled in bf16 like the training rollouts.
        models = (policy,) if state.teacher is None else (policy, state.teacher.model)
        with rollout_precision(cfg.precision, *models):
            teacher = policy
            if state.teacher is not None and state.teacher.initialized:
                teacher = state.teacher.model
            score = (windows.tokens, windows.valid, windows.rows, windows.cols, windows.targets,
                     tok.vocab_size)
            s_policy = score_next_tokens(policy, *score)
            s_teacher = s_policy if teacher is policy else score_next_tokens(teacher, *score)
            thoughts = sample_thoughts(
                policy, policy_prompts, group_size=r.group_size,
                max_thought_tokens=r.max_thought_tokens,
                temperature=r.temperature, top_p=r.top_p, think_start=list(template.lead),
                think_end=tok.think_end, pad=tok.pad, vocab_size=tok.vocab_size,
                seed=cfg.train.seed, step=EVAL_STEP_KEY)
    finally:
        policy.train(was_training)
    s_teacher = gather_data_parallel(s_teacher.float())
    s_policy = gather_data_parallel(s_policy.float())
    s_think = gather_data_parallel(thoughts.s_pred.float().view(-1, r.group_size))
    closed = gather_data_parallel(thoughts.closed.float())
    return {
        "val_nll_teacher": float(-s_teacher.mean()),
        "val_nll_policy": float(-s_policy.mean()),
        "val_nll_think": float(-s_think.mean()),
        "val_info_gain": float((s_think - s_teacher[:, None]).mean()),
        "val_closed_fraction": float(closed.mean()),
        "val_contexts": float(n),
    }
