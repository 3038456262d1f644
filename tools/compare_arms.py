"""The arms of tools/compare_rlp_ntp.py: each starts from the base's weights, trains with the
project's own `rlp_step` or `ntp_step`, and is evaluated on the held-out items in three modes
(raw and fair no-thought baselines, and after sampled thoughts: eval/benchmark.py).
Compute is counted as the module docstring of compare_rlp_ntp.py says."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path


def fingerprint(model) -> str:
    """SHA-256 (16 hex digits) of every parameter's bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def start_arm(cfg, checkpoint: Path):
    """A fresh TrainState of `cfg` with the base's policy weights (fresh optimizer, step 0)."""
    from megatron_rlp.checkpoint import load_checkpoint
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.resume import ResumeOptions

    state = build_state(cfg)
    load_checkpoint(state, str(checkpoint), True, {}, ResumeOptions(finetune=True))
    return state


MODES = {"no_think": dict(), "no_think_fair": dict(ban_think=True), "think": dict(think=True)}


def evaluate(state, records: list[dict], think_samples: int, seed: int) -> dict:
    """Held-out metrics of the state's policy in each of MODES (eval/benchmark.py), with the
    accuracy's standard error over items."""
    from megatron_rlp.eval.benchmark import BenchmarkOptions, run_benchmark
    from megatron_rlp.eval.intervals import mean_interval
    from megatron_rlp.eval.loading import EvalModel

    em = EvalModel(cfg=state.cfg, tokenizer=state.tokenizer, policy=state.policy,
                   source=f"step {state.step}")
    state.policy.eval()
    start, out = time.perf_counter(), {}
    try:
        for mode, options in MODES.items():
            samples = think_samples if mode == "think" else 1
            metrics, items = run_benchmark(em, records, BenchmarkOptions(
                samples=samples, seed=seed, batch_size=64, **options))
            per_item = [sum(r["correct"]) / samples for r in items]
            sd = mean_interval(per_item)["sd"] if len(per_item) > 1 else 0.0
            metrics["accuracy_se"] = sd / math.sqrt(len(per_item))
            out[mode] = metrics
    finally:
        state.policy.train()
    out["eval_s"] = time.perf_counter() - start
    return out


def summary_line(name: str, point: dict) -> str:
    e = point["eval"]
    acc = " / ".join(f"{e[m]['accuracy']:.3f}" for m in MODES)
    ll = " / ".join(f"{e[m]['answer_logprob']:.2f}" for m in MODES)
    return (f"[compare] {name} step {point['step']:4d} tokens {point['compute_tokens']:8d}: "
            f"acc (raw / fair / think) {acc} | answer ll {ll}")


def run_rlp(args, cfg, checkpoint: Path, records, eval_steps: set[int], name: str) -> dict:
    from megatron_rlp.data.answer_positions import AnswerPositionSampler
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    state = start_arm(cfg, checkpoint)
    r = cfg.rlp
    k = getattr(r, "reward_tokens", 1)
    if args.positions == "answer":
        sampler = AnswerPositionSampler(state.corpus, r.min_prefix_tokens, r.max_prefix_tokens,
                                        cfg.train.seed, state.tokenizer.think_end)
    else:
        sampler = make_context_sampler(state)
    arm = {"start_fingerprint": fingerprint(state.policy), "steps": [], "points": []}
    timer, wall, cpu, compute = PhaseTimer(), 0.0, 0.0, 0
    while state.step < cfg.train.steps:
        t0, c0 = time.perf_counter(), time.process_time()
        m = rlp_step(state, sampler, timer)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        rows = r.contexts_per_step * r.group_size
        # m["tokens"] = sum over rows of (prefix + lead + thought): the G rows of a context
        # share its prefix, so the contexts' input tokens are (tokens - rows*(1+len)) / G.
        inputs = round((m["tokens"] - rows * (1 + m["thought_len"])) / r.group_size)
        compute += r.group_size * r.max_thought_tokens * r.contexts_per_step + inputs \
            + k * r.contexts_per_step
        m.update(timer.pop(), input_tokens=inputs, compute_tokens=compute, wall_s=wall)
        arm["steps"].append({key: m[key] for key in (
            "reward_mean", "reward_std", "s_pred", "s_ema", "thought_len", "closed_fraction",
            "loss", "grad_norm", "input_tokens", "compute_tokens", "wall_s")})
        if state.step % 10 == 0 or state.step == 1:
            print(f"[{name} step {state.step:4d}] reward {m['reward_mean']:+.3f} s_pred "
                  f"{m['s_pred']:.3f} s_ema {m['s_ema']:.3f} think_len {m['thought_len']:.1f} "
                  f"closed {m['closed_fraction']:.2f} | {wall:.0f}s", flush=True)
        if state.step in eval_steps:
            point = {"step": state.step, "compute_tokens": compute, "wall_s": wall,
                     "eval": evaluate(state, records, args.think_samples, cfg.train.seed)}
            arm["points"].append(point)
            print(summary_line(name, point), flush=True)
    arm.update(wall_s=wall, cpu_s=cpu, compute_tokens=compute, reward_tokens=k)
    return arm


def run_ntp(args, cfg, checkpoint: Path, records, matched: list[int], rlp_wall: float) -> dict:
    """NTP from the base: evaluated at the compute-matched steps `matched` (the last is the
    largest RLP arm's total), then, with --wall-match, at the RLP arm's training wall time."""
    from megatron_rlp.train.ntp_step import ntp_step
    from megatron_rlp.train.samplers import make_ntp_batcher
    from megatron_rlp.train.timers import PhaseTimer

    state = start_arm(cfg, checkpoint)
    batcher, timer = make_ntp_batcher(state), PhaseTimer()
    arm = {"start_fingerprint": fingerprint(state.policy), "steps": [], "points": []}
    per_step = cfg.data.ntp_batch_size * cfg.data.ntp_seq_length
    wall, cpu, last, wall_point = 0.0, 0.0, matched[-1], None
    while state.step < cfg.train.steps:
        t0, c0 = time.perf_counter(), time.process_time()
        m = ntp_step(state, batcher, timer)
        timer.pop()
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        arm["steps"].append({"loss": m["loss"], "wall_s": wall})
        due = state.step in matched
        if args.wall_match and wall_point is None and state.step > last and wall >= rlp_wall:
            wall_point, due = state.step, True
        if due:
            point = {"step": state.step, "compute_tokens": state.step * per_step,
                     "wall_s": wall, "matched": "wall" if state.step > last else "compute",
                     "eval": evaluate(state, records, args.think_samples, cfg.train.seed)}
            arm["points"].append(point)
            print(summary_line(f"ntp ({point['matched']})", point), flush=True)
        if state.step >= last and (not args.wall_match or wall_point is not None):
            break
    arm.update(wall_s=wall, cpu_s=cpu, compute_tokens=state.step * per_step,
               matched_steps=matched, wall_matched_step=wall_point)
    return arm
