"""The packed RLP update eager vs compiled (`train.compile_update`), side by side in one process.

    python tools/bench_compiled_update.py --size 25m --out docs/bench/compiled_update_25m_g16.json \
        rlp.positions_per_document=1 rlp.group_size=16 rlp.min_prefix_tokens=160 \
        rlp.max_prefix_tokens=160 device.num_threads=1

Builds `tools/bench_rlp.py`'s model and shape (`--size`, bench defaults, then overrides),
draws one rollout (`rlp_step.rollout_and_score`) and runs the step's update on it (`rlp_step`
with that rollout: same micro-batches, forward step, Megatron schedule, DDP and optimizer)
with `train.compile_update` off and on in turn, `--steps` times after one warm-up each. The
compiled warm-up compiles the layers' graphs: its wall seconds, less the median compiled
update's, are reported apart as the compile time (`compile_s`; inductor's C++ compiler runs
in worker processes, outside the thread's CPU time). Per update: CPU seconds of the thread
(`time.thread_time`: the machine is shared) and wall seconds, the achieved FLOP rate per CPU
second (FLOP model of `train/flops.py`, tree pairs only) against a plain fp32 1024^3 matmul
on the same thread (per CPU second, and per wall second as `bench_rlp` reports it), and the
graph compilations (`update_compiles`). Equality with the eager update is
tests/unit/test_compiled_update.py's job.
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


def main(argv: list[str] | None = None) -> int:
    from bench_rlp import SIZES, matmul_flop_per_s, start_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("--size", choices=["config", *SIZES], default="25m")
    parser.add_argument("--steps", type=int, default=3, help="timed updates per setting")
    parser.add_argument("--out", default="runs/bench/compiled_update.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value, after the defaults")
    args = parser.parse_args(argv)

    cfg = start_bench(args)
    if cfg is None:
        return 2
    import torch

    from megatron_rlp import distributed
    from megatron_rlp.train import compiled_update
    from megatron_rlp.train import rlp_step as step_module
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.flops import model_dims, step_flops
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    rollout = step_module.rollout_and_score
    settings = {"eager": False, "compiled": True}
    try:
        state = build_state(cfg)
        sampler = make_context_sampler(state)
        ro = rollout(state, sampler, 1)
        step_module.rollout_and_score = lambda *a, **k: ro  # every update on this rollout
        trace = {}
        step_module.record_step(1, ro, trace)
        flop = step_flops(model_dims(cfg, state.tokenizer.vocab_size), trace)["update"]
        configs = {name: dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, compile_update=on)) for name, on in settings.items()}
        cpu = {k: [] for k in settings}
        wall = {k: [] for k in settings}

        def update(name: str) -> None:
            state.cfg = configs[name]
            w, c = time.perf_counter(), time.thread_time()
            step_module.rlp_step(state, sampler, PhaseTimer())
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - w)

        for _ in range(args.steps + 1):  # the first round: warm-up (and the compile)
            for name in settings:
                update(name)
    finally:
        step_module.rollout_and_score = rollout
        distributed.shutdown()
    mm, mm_wall = matmul_flop_per_cpu_s(), matmul_flop_per_s()
    out = {}
    for name in settings:
        med_cpu = statistics.median(cpu[name][1:])
        out[name] = {"update_cpu_s": _stats(cpu[name][1:]), "update_wall_s": _stats(wall[name][1:]),
                     "warmup_wall_s": wall[name][0], "warmup_cpu_s": cpu[name][0],
                     "update_flop_per_cpu_s": flop / med_cpu}
    out["compiled"]["compile_s"] = wall["compiled"][0] - out["compiled"]["update_wall_s"]["median"]
    res = {"settings": out, "update_flop": flop, "matmul_flop_per_cpu_s": mm,
           "matmul_flop_per_s": mm_wall,
           "speedup_cpu": out["eager"]["update_cpu_s"]["median"]
           / out["compiled"]["update_cpu_s"]["median"],
           "update_compiles": compiled_update.compile_count(),
           "thought_len": float(ro.thoughts.lengths.float().mean()),
           "rows": len(ro.thoughts.tokens),
           "run": {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                   "steps": args.steps, "config": cfg.to_dict()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for name, s in out.items():
        print(f"[bench_compiled_update] {name:8s} update {s['update_cpu_s']['median']:.3f} CPU s "
              f"({s['update_wall_s']['median']:.3f} wall), "
              f"{s['update_flop_per_cpu_s'] / 1e9:.1f} GFLOP/s per CPU s "
              f"(plain matmul {mm / 1e9:.1f} per CPU s)")
    print(f"[bench_compiled_update] compiled/eager speedup {res['speedup_cpu']:.2f}x; compile "
          f"{out['compiled']['compile_s']:.1f} s wall, {res['update_compiles']} graphs")
    return 0


def matmul_flop_per_cpu_s(n: int = 1024, repeats: int = 5) -> float:
    """`bench_rlp.matmul_flop_per_s` per CPU second of the thread (`time.thread_time`, as the
    updates are timed: on a loaded machine the wall-clock yardstick waits for a core)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        a @ b
        best = min(best, time.thread_time() - start)
    return 2 * n ** 3 / best


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": values}


if __name__ == "__main__":
    sys.exit(main())
