"""Decode step: eager vs compiled (`rlp.compile_decode`), side by side in one process.

    python tools/bench_decode.py --size 0.8m --out docs/bench/decode_compiled_0.8m.json \
        rlp.positions_per_document=1 rlp.group_size=4 rlp.min_prefix_tokens=160 \
        rlp.max_prefix_tokens=160 device.num_threads=1

Builds `tools/bench_rlp.py`'s model and shape (`--size`, bench defaults, then overrides)
once and runs the step's real rollout path (`rlp_step.rollout_and_score`, no update: the
random policy thinks to the budget) with `rlp.compile_decode` off and on in turn, the order
rotating each step, on the same contexts. Per mode: decode ms per step (`DecodeMeter`: the
engine's step, mask bookkeeping + model forward), sampling ms per step (the sampler's
calls), rollout seconds, decoded tokens/s; for the compiled mode also the first rollout's
seconds (compilation included) and the graph compilations (`decode_compiles`). Thoughts of
the two modes are checked identical and log-probs compared on every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


class SampleMeter:
    """Wall time of the decode loop's sampler calls (eager or compiled)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def __enter__(self):
        from megatron_rlp.packing import compiled
        from megatron_rlp.rollout import thoughts

        self.undo = [(thoughts, "sample_vocab_parallel", thoughts.sample_vocab_parallel),
                     (compiled, "compiled_sampler", compiled.compiled_sampler)]
        for owner, name, fn in self.undo:
            setattr(owner, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed

    def __exit__(self, *exc):
        for owner, name, fn in self.undo:
            setattr(owner, name, fn)


def run(cfg, steps: int) -> dict:
    import torch
    from bench_rlp import DecodeMeter

    from megatron_rlp.packing import compiled
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.rlp_step import rollout_and_score
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    state = build_state(cfg)
    sampler = make_context_sampler(state)
    configs = {name: dataclasses.replace(cfg, rlp=dataclasses.replace(cfg.rlp,
                                                                      compile_decode=on))
               for name, on in (("eager", False), ("compiled", True))}
    rows = {name: [] for name in configs}
    first = {}
    checks = []
    names = list(configs)
    for i in range(steps + 1):  # step 0: warm-up (the compiled mode compiles here)
        order = names[i % 2:] + names[:i % 2]
        out = {}
        for name in order:
            state.cfg = configs[name]  # same step index: the same contexts in both modes
            timer = PhaseTimer()
            with DecodeMeter() as meter, SampleMeter() as sample:
                ro = rollout_and_score(state, sampler, i + 1, timer)
            seconds = timer.pop()["rollout"]
            out[name] = ro.thoughts
            decoded = float(ro.thoughts.lengths.sum())
            row = {"rollout_s": seconds, "decode_steps": meter.steps,
                   "decode_ms_per_step": 1e3 * meter.seconds / max(meter.steps, 1),
                   "sampling_ms_per_step": 1e3 * sample.seconds / max(sample.calls, 1),
                   "decoded_tokens_per_s": decoded / seconds,
                   "rollout_cache_bytes": meter.cache_bytes}
            if i == 0:
                first[name] = row
            else:
                rows[name].append(row)
        e, c = out["eager"], out["compiled"]
        checks.append({"step": i + 1, "thoughts_equal": bool(torch.equal(e.tokens, c.tokens)),
                       "logprob_max_diff": float((e.logprobs - c.logprobs).abs().max()),
                       "s_pred_max_diff": float((e.s_pred - c.s_pred).abs().max())})
    state.cfg = cfg
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in rows.items()}
    ratio = summary["eager"]["decode_ms_per_step"] / summary["compiled"]["decode_ms_per_step"]
    return {"median": summary, "first_rollout": first, "steps": rows, "checks": checks,
            "decode_speedup": ratio,
            "rollout_speedup": summary["eager"]["rollout_s"] / summary["compiled"]["rollout_s"],
            "decode_compiles": compiled.compile_count()}


def main(argv: list[str] | None = None) -> int:
    from bench_rlp import SIZES, start_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("--size", choices=["config", *SIZES], default="0.8m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/decode_compiled.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value, after the defaults")
    args = parser.parse_args(argv)

    cfg = start_bench(args)
    if cfg is None:
        return 2
    import torch

    from megatron_rlp import distributed

    try:
        res = run(cfg, args.steps)
    finally:
        distributed.shutdown()
    res["run"] = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                  "config": cfg.to_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    m = res["median"]
    for name in ("eager", "compiled"):
        print(f"{name:9s} decode {m[name]['decode_ms_per_step']:.2f} ms/step, sampling "
              f"{m[name]['sampling_ms_per_step']:.2f} ms/step, "
              f"rollout {m[name]['rollout_s']:.3f} s")
    print(f"decode step {res['decode_speedup']:.2f}x, rollout {res['rollout_speedup']:.2f}x, "
          f"first compiled rollout {res['first_rollout']['compiled']['rollout_s']:.1f} s, "
          f"{res['decode_compiles']} compiles; thoughts equal: "
          f"{all(c['thoughts_equal'] for c in res['checks'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
