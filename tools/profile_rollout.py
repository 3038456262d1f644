"""Where a rollout's decode time goes: Megatron module, inference bookkeeping, sampling,
cache compaction, Python (issue 28, item 1).

    python tools/profile_rollout.py --size 0.8m --out docs/bench/profile_rollout_0.8m.json \
        device.num_threads=1

Builds `tools/bench_rlp.py`'s model and shape (`--size`, bench defaults, then overrides) and
runs `--steps` rollouts (after `--warmup`) of the step's real path (`rlp_step`'s
`rollout_and_score`, no update: the policy stays random and thinks to the budget). The
rollout's functions are wrapped in named regions (wall seconds, `time.perf_counter`, and the
thread's CPU seconds, `time.thread_time`; with `rlp.compile_decode=true` the compiled step,
sampler and S_pred scorer are the regions below):

    prefill        the window / prompt prefill (with the `<think>` lead)
    fork           the G-way fork of the prefix cache
    decode_step    `KVCacheEngine.step`: key mask + position bookkeeping + the forward,
      module         of which Megatron's model forward (`stage_forward`)
    sampling       keyed noise over the vocabulary, top-p, log-probs (`sample_vocab_parallel`)
    s_pred         log-prob of the true token after `</think>`
    compaction     `KVCacheEngine.keep` (finished rows leave the cache)
    loop           the rest of `sample_thoughts`: the Python decode loop's own tensor work

One extra rollout runs under `torch.profiler` to split each region into operator time (the
aten ops' self CPU time) and the Python / dispatch time between them. Profiling adds a few
microseconds per op, so the profiled split is read as shares, the wall-clock table as times.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

REGIONS = ("prefill", "fork", "decode_step", "decode_step/module", "sampling", "s_pred",
           "compaction")


class Regions:
    """Nested regions, keyed by path ("rollout/decode_step/module"): wall seconds
    (`seconds`) and this thread's CPU seconds (`cpu`, what a quiet core would take)."""

    def __init__(self):
        self.stack: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, fn, name: str):
        from torch.profiler import record_function

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if self.stack and self.stack[-1] == name:  # an override calling its base
                return fn(*args, **kwargs)
            path = "/".join([*self.stack, name])
            self.stack.append(name)
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                with record_function(path):
                    return fn(*args, **kwargs)
            finally:
                self.seconds[path] += time.perf_counter() - start
                self.cpu[path] += time.thread_time() - cpu
                self.calls[path] += 1
                self.stack.pop()
        return inner

    def patch(self, owner, attr: str, name: str, undo: list) -> None:
        old = owner.__dict__[attr]
        undo.append((owner, attr, old))
        setattr(owner, attr, self.wrap(old, name))


def _instrument(regions: Regions) -> list:
    from megatron_rlp.packing import compiled, decode, prefill
    from megatron_rlp.rollout import engine, thoughts

    undo: list = []
    for attr, name in (("fork", "fork"), ("keep", "compaction"),  # its own (cascade) ones
                       ("step", "decode_step")):  # the compiled step (rlp.compile_decode)
        regions.patch(decode.SharedPrefixEngine, attr, name, undo)
    regions.patch(thoughts, "sample_thoughts", "rollout", undo)
    regions.patch(prefill.SharedWindows, "prefill", "prefill", undo)  # the shared prefill
    regions.patch(engine.KVCacheEngine, "prefill", "prefill", undo)
    regions.patch(engine.KVCacheEngine, "fork", "fork", undo)
    regions.patch(engine.KVCacheEngine, "keep", "compaction", undo)
    regions.patch(engine.KVCacheEngine, "step", "decode_step", undo)
    regions.patch(engine, "stage_forward", "module", undo)
    regions.patch(compiled, "compiled_call", "module", undo)  # rlp.compile_decode=true
    regions.patch(thoughts, "sample_vocab_parallel", "sampling", undo)
    regions.patch(compiled, "compiled_sampler", "sampling", undo)
    regions.patch(thoughts, "token_logprobs_vocab_parallel", "s_pred", undo)
    regions.patch(compiled, "compiled_scorer", "s_pred", undo)
    return undo


def _table(regions: Regions, steps: int, cpu: bool = False) -> dict:
    """Per-rollout seconds of each region (decode-step regions also per call); wall, or
    with `cpu` the thread's CPU seconds."""
    sec, calls = regions.cpu if cpu else regions.seconds, regions.calls
    total = sec["rollout"]
    out = {"rollout": total / steps}
    for name in REGIONS:
        out[name] = sec[f"rollout/{name}"] / steps
    out["decode_step/bookkeeping"] = out["decode_step"] - out["decode_step/module"]
    out["loop"] = total / steps - sum(out[k] for k in ("prefill", "fork", "decode_step",
                                                       "sampling", "s_pred", "compaction"))
    out["decode_steps_per_rollout"] = calls["rollout/decode_step"] / steps
    steps_done = max(calls["rollout/decode_step"], 1)
    out["ms_per_decode_step"] = 1e3 * sec["rollout/decode_step"] / steps_done
    return out


def _op_split(prof) -> dict:
    """For each region path: wall (its own record_function event) and the self CPU time of
    the aten ops under it (the rest is Python and dispatch), summed over the profile, in s."""
    events = prof.events()
    out: dict[str, dict[str, float]] = {}

    def op_time(ev) -> float:
        total = 0.0
        for child in ev.cpu_children:
            if child.name.startswith("rollout"):
                total += op_time(child)
            else:
                total += child.cpu_time_total  # an op and everything it calls
        return total

    for ev in events:
        if not ev.name.startswith("rollout"):
            continue
        d = out.setdefault(ev.name, {"wall": 0.0, "ops": 0.0, "top_ops": defaultdict(float)})
        d["wall"] += ev.cpu_time_total / 1e6
        d["ops"] += op_time(ev) / 1e6
        for child in ev.cpu_children:
            if not child.name.startswith("rollout"):
                d["top_ops"][child.name] += child.cpu_time_total / 1e6
    for d in out.values():  # the 8 costliest top-level ops of each region
        d["top_ops"] = dict(sorted(d["top_ops"].items(), key=lambda kv: -kv[1])[:8])
    return out


def main(argv: list[str] | None = None) -> int:
    from bench_rlp import SIZES, start_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("--size", choices=["config", *SIZES], default="0.8m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/profile_rollout.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value, after the defaults")
    args = parser.parse_args(argv)

    cfg = start_bench(args)
    if cfg is None:
        return 2
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_rlp import distributed
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.rlp_step import rollout_and_score
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    try:
        state = build_state(cfg)
        sampler = make_context_sampler(state)
        for i in range(args.warmup):
            rollout_and_score(state, sampler, i + 1)
        regions = Regions()
        undo = _instrument(regions)
        try:
            timer = PhaseTimer()
            for i in range(args.steps):
                ro = rollout_and_score(state, sampler, args.warmup + i + 1, timer)
            phases = {k: v / args.steps for k, v in timer.pop().items()}
            table = _table(regions, args.steps)
            table_cpu = _table(regions, args.steps, cpu=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                rollout_and_score(state, sampler, args.warmup + args.steps + 1)
            ops = _op_split(prof)
        finally:
            for owner, attr, old in reversed(undo):
                setattr(owner, attr, old)
    finally:
        distributed.shutdown()
    res = {"wall_s_per_rollout": table, "cpu_s_per_rollout": table_cpu, "phases_s": phases,
           "profiled_one_rollout_s": ops,
           "thought_len": float(ro.thoughts.lengths.float().mean()),
           "rows": len(ro.thoughts.tokens),
           "run": {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                   "load_average": os.getloadavg(),
                   "config": cfg.to_dict()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    t = table_cpu
    print(f"[profile_rollout] CPU s: rollout {t['rollout'] * 1e3:.1f} ms = prefill "
          f"{t['prefill'] * 1e3:.1f} + fork {t['fork'] * 1e3:.1f} + decode steps "
          f"{t['decode_step'] * 1e3:.1f} (module {t['decode_step/module'] * 1e3:.1f}, "
          f"bookkeeping {t['decode_step/bookkeeping'] * 1e3:.1f}; "
          f"{t['decode_steps_per_rollout']:.0f} steps, {t['ms_per_decode_step']:.2f} ms each) "
          f"+ sampling {t['sampling'] * 1e3:.1f} + s_pred {t['s_pred'] * 1e3:.1f} + "
          f"compaction {t['compaction'] * 1e3:.1f} + loop {t['loop'] * 1e3:.1f}")
    for path, d in sorted(ops.items()):
        print(f"[profile_rollout] profiled {path:40s} wall {d['wall'] * 1e3:8.1f} ms | ops "
              f"{d['ops'] * 1e3:8.1f} ms | python/dispatch {(d['wall'] - d['ops']) * 1e3:8.1f} ms")
    top = ops.get("rollout/decode_step/module", {}).get("top_ops", {})
    print("[profile_rollout] decode module's top ops: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in top.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
