"""The training loop: build, optionally load, then step / log / checkpoint until done."""

from __future__ import annotations

import time

from megatron_rlp.config import RunConfig
from megatron_rlp.data import ContextSampler, NTPBatcher
from megatron_rlp.train.builder import TrainState, build_state
from megatron_rlp.train.checkpoint import load_checkpoint, save_checkpoint
from megatron_rlp.train.metrics import MetricsWriter
from megatron_rlp.train.ntp_step import ntp_step
from megatron_rlp.train.rlp_step import rlp_step
from megatron_rlp.train.timers import PhaseTimer


def _step_fn(state: TrainState):
    cfg = state.cfg
    if cfg.train.objective == "rlp":
        sampler = ContextSampler(state.corpus, min_prefix=cfg.rlp.min_prefix_tokens,
                                 max_prefix=cfg.rlp.max_prefix_tokens, seed=cfg.train.seed)
        return lambda timer: rlp_step(state, sampler, timer)
    batcher = NTPBatcher(state.corpus, seq_length=cfg.data.ntp_seq_length, seed=cfg.train.seed)
    return lambda timer: ntp_step(state, batcher, timer)


def train(cfg: RunConfig) -> TrainState:
    """Run `cfg.train.steps` optimizer steps (counted from a resumed step, if any)."""
    state = build_state(cfg)
    writer = MetricsWriter(cfg.train.metrics_file, cfg.train.objective)
    if cfg.train.load:
        how = load_checkpoint(state, cfg.train.load)
        if writer.rank0:
            print(f"[load] {how} from {cfg.train.load} at step {state.step}", flush=True)
    step_fn, timer = _step_fn(state), PhaseTimer()
    save_every = cfg.train.save_interval
    while state.step < cfg.train.steps:
        start = time.perf_counter()
        metrics = step_fn(timer)
        elapsed = time.perf_counter() - start
        metrics.update(
            lr=state.optimizer.param_groups[0]["lr"],
            step_time=elapsed,
            tokens_per_s=metrics["tokens"] / elapsed,
            **{f"t_{k}": v for k, v in timer.pop().items()},
        )
        writer.log(state.step, metrics,
                   console=state.step % cfg.train.log_interval == 0 or state.step == 1)
        if cfg.train.save and save_every and state.step % save_every == 0:
            save_checkpoint(state, cfg.train.save)
    if cfg.train.save and (not save_every or state.step % save_every):
        save_checkpoint(state, cfg.train.save)
    writer.close()
    return state
