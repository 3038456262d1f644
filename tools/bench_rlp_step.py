"""Benchmark RLP (or NTP) training steps: time per phase, throughput, peak memory, as JSON.

    python tools/bench_rlp_step.py --config examples/configs/tiny_cpu.yaml --out bench.json
    torchrun --nproc-per-node 2 tools/bench_rlp_step.py --config examples/configs/tiny_cpu.yaml \
        --steps 10 --warmup 2 --out bench_dp2.json parallel.tensor_model_parallel_size=2

Runs the trainer's own step functions (`rlp_step` / `ntp_step`) on a freshly built model (or
`train.load`, e.g. the demo's warm-up checkpoint) for `--warmup` untimed and `--steps` timed
steps; nothing is saved. Rank 0 writes:

  phases     seconds per step of rollout / scoring / update (mean, median, min, max) and of
             the whole step; the maximum over ranks for each step (the slowest rank sets
             the pace)
  throughput tokens/s (prefix + thought tokens trained on per step / step time) and, for
             RLP, decoded thought tokens/s of the rollout phase
  memory     peak GPU memory allocated (cuda) or peak resident set size (cpu), max over ranks
  run        device, layout, versions, git commit, the resolved config

Speed targets belong here, not in unit tests: compare JSON files from the same machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


def _peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def run(cfg, steps: int, warmup: int) -> dict:
    """Build a fresh state for `cfg` and time `warmup + steps` training steps."""
    import torch
    from megatron.core import parallel_state

    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.ntp_step import ntp_step
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler, make_ntp_batcher
    from megatron_rlp.train.timers import PhaseTimer

    state = build_state(cfg)
    if cfg.train.load:  # e.g. a warmed-up model, whose thoughts close (rollout lengths vary)
        from megatron_rlp.checkpoint import load_checkpoint, resolve_checkpoint

        load_checkpoint(state, str(resolve_checkpoint(cfg.train.load)),
                        cfg.train.checkpoint_checksums)
    rlp = cfg.train.objective == "rlp"
    if rlp:
        sampler = make_context_sampler(state)
        step_fn = lambda timer: rlp_step(state, sampler, timer)  # noqa: E731
    else:
        batcher = make_ntp_batcher(state)
        step_fn = lambda timer: ntp_step(state, batcher, timer)  # noqa: E731

    timer, rows = PhaseTimer(), []
    for i in range(warmup + steps):
        if i == warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = step_fn(timer)
        seconds = time.perf_counter() - start
        phases = timer.pop()
        if i >= warmup:
            rows.append({"step": seconds, **phases, "tokens": metrics["tokens"],
                         "thought_len": metrics.get("thought_len", 0.0)})

    names = ["step"] + sorted({k for r in rows for k in r} - {"step", "tokens", "thought_len"})
    slowest = {n: _max_over_ranks([r.get(n, 0.0) for r in rows]) for n in names}
    peak = _max_over_ranks([float(_peak_memory_bytes())])[0]
    step_s = slowest["step"]
    result = {
        "objective": cfg.train.objective,
        "steps": steps,
        "warmup": warmup,
        "phases_s": {n: _summary(v) for n, v in slowest.items()},
        "throughput": {
            "tokens_per_s": sum(r["tokens"] for r in rows) / sum(step_s),
        },
        "memory": {"peak_bytes": peak, "peak_gib": peak / 2**30,
                   "kind": "cuda max_memory_allocated" if torch.cuda.is_available()
                   else "cpu peak RSS"},
        "run": {
            "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                       else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} "
                            f"threads/rank)"),
            "world_size": torch.distributed.get_world_size(),
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "torch": torch.__version__,
            "megatron_core": importlib.metadata.version("megatron-core"),
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            "config": cfg.to_dict(),
        },
    }
    if rlp:
        r = cfg.rlp
        decoded = [r.contexts_per_step * r.group_size * row["thought_len"] for row in rows]
        result["throughput"]["rollout_decoded_tokens_per_s"] = (
            sum(decoded) / sum(slowest["rollout"]))
        result["throughput"]["rollouts_per_s"] = (
            steps * r.contexts_per_step * r.group_size / sum(slowest["rollout"]))
    return result


def _line(res: dict) -> str:
    ph = res["phases_s"]
    parts = [f"step {ph['step']['mean']:.3f}s"]
    parts += [f"{k} {v['mean']:.3f}s" for k, v in ph.items() if k != "step"]
    parts.append(f"{res['throughput']['tokens_per_s']:.0f} tok/s")
    if "rollout_decoded_tokens_per_s" in res["throughput"]:
        parts.append(f"decode {res['throughput']['rollout_decoded_tokens_per_s']:.0f} tok/s")
    parts.append(f"peak {res['memory']['peak_gib']:.2f} GiB ({res['memory']['kind']})")
    return "[bench] " + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (as for pretrain_rlp.py)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--out", default="bench_rlp_step.json", help="JSON file (rank 0)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for training")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2

    from megatron_rlp.startup import load_launch_config, quiet_megatron

    cfg = load_launch_config(args.config, tuple(args.overrides))  # exit 2 on a bad value
    quiet_megatron(checkpoint=False)
    # Megatron's modules are imported before the CPU backend patches torch (as pretrain_rlp.py
    # does): some torch.compile at import time and must see the real torch.cuda.
    import megatron_rlp.train.loop  # noqa: F401
    from megatron_rlp import distributed

    distributed.initialize(cfg)
    try:
        res = run(cfg, args.steps, args.warmup)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
            print(_line(res), flush=True)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
