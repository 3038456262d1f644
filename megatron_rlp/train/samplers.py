"""The data a run's steps draw from, built from its config: RLP context samplers (with the
teacher as entropy scorer when `rlp.position_strategy=entropy`) and NTP batchers."""

from __future__ import annotations

from megatron_rlp.data import ContextSampler, NTPBatcher, build_context_sampler
from megatron_rlp.scoring.entropy import model_entropy_scorer
from megatron_rlp.train.builder import TrainState


def scoring_model(state: TrainState):
    """The model that scores positions: the EMA teacher once it exists, else the policy (the
    teacher starts as a copy of it)."""
    if state.teacher is not None and state.teacher.initialized:
        return state.teacher.model
    return state.policy


def entropy_scorer(state: TrainState):
    """The `entropy` strategy's scorer: the scoring model's next-token entropies, its forward
    under `rollout_precision` (bf16 under FP8 training, like the rollouts)."""
    return model_entropy_scorer(lambda: scoring_model(state), state.tokenizer.vocab_size,
                                state.tokenizer.pad, state.cfg.precision)


def make_context_sampler(state: TrainState, corpus=None) -> ContextSampler:
    """The RLP context sampler of `state.cfg` over `corpus` (default: the train split)."""
    cfg = state.cfg
    scorer = None
    if cfg.rlp.position_strategy == "entropy":
        scorer = entropy_scorer(state)
    return build_context_sampler(cfg.rlp, state.corpus if corpus is None else corpus,
                                 cfg.train.seed, scorer, thought_markers(state))


def thought_markers(state: TrainState) -> tuple[int, int]:
    """The tokenizer's (`<think>`, `</think>`) ids."""
    return state.tokenizer.think_start, state.tokenizer.think_end


def make_ntp_batcher(state: TrainState) -> NTPBatcher:
    """Next-token windows of `data.ntp_seq_length + 1` tokens from the train split."""
    return NTPBatcher(state.corpus, seq_length=state.cfg.data.ntp_seq_length,
                      seed=state.cfg.train.seed)
