"""Where the packed RLP update's time goes, per core attention path (issue 28, the 25M G=16
target).

    python tools/profile_update.py --size 25m --out docs/bench/profile_update_25m_g16.json \
        rlp.positions_per_document=1 rlp.group_size=16 rlp.min_prefix_tokens=160 \
        rlp.max_prefix_tokens=160 device.num_threads=1

Builds `tools/bench_rlp.py`'s model and shape (`--size`, bench defaults, then overrides),
draws one rollout (`rlp_step`'s `rollout_and_score`) and runs the step's update on it
(`rlp_step` with that rollout: same micro-batches, forward step, Megatron schedule, DDP and
optimizer) for each `--attention` path (`model.packed_attention`), alternating the paths
`--steps` times after a warm-up. Regions of the median update, in CPU seconds of the thread
(`time.thread_time`: the machine this ran on is shared, and a one-thread process's CPU time
leaves out its waits for a core; wall seconds are reported per update too):

    forward     the forward step: Megatron's model forward, logits at the thought positions
      core_attention   of which the layers' core attention (QK^T, mask, softmax, PV)
    loss        log-softmax over the vocabulary + clipped surrogate (`rlp_loss`)
    backward    Megatron's `backward_step` (autograd through all of the above)
    finalize    `finalize_model_grads` (DDP's grad buffer reduction; one rank: no-op sync)
    optimizer   Megatron's optimizer step (clip, AdamW) and the finiteness check
    rest        micro-batch layout on the host, gradient zeroing, Python

One more update per path runs under `torch.profiler`: operator self time by family (GEMM,
attention softmax/mask, elementwise, copies, ...) in the forward and in the backward, and
the Python/dispatch time between operators. The core attention of the real micro-batch is
also timed alone (CPU seconds), forward and backward, per path. The update's achieved FLOP
rate (FLOP model of `train/flops.py`, tree pairs only) is set against a plain fp32 1024^3
matmul on the same thread, per wall second and per CPU second of the thread. Profiling
adds a few microseconds per op: read its split as shares.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

FAMILIES = (  # operator name -> family, first match wins
    ("gemm", ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::matmul")),
    ("attention kernel (SDPA)", ("scaled_dot_product",)),
    ("softmax + mask", ("softmax", "masked_fill", "aten::where")),
    ("copies (copy_, cat, fill_, gather)", ("aten::copy_", "aten::cat", "aten::fill_",
                                            "aten::zero_", "aten::gather", "aten::scatter",
                                            "aten::index", "aten::repeat_interleave",
                                            "aten::clone", "aten::contiguous")),
    ("elementwise (norm, SwiGLU, RoPE, adds)", ("aten::",)),
)


class Regions:
    """CPU seconds of this thread in named regions (summed; `time.thread_time`, which on a
    shared machine leaves out the waits for a core), also marked for the profiler."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, fn, name: str):
        from torch.profiler import record_function

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            start = time.thread_time()
            try:
                with record_function(f"region/{name}"):
                    return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.thread_time() - start
        return inner


def _instrument(regions: Regions, state) -> list:
    """Wrap the update's pieces; returns (owner, attr, old) to undo."""
    import torch
    from megatron.core.pipeline_parallel import schedules

    from megatron_rlp.train import rlp_step, update

    undo = []

    def patch(owner, attr, name, wrapper=None):
        old = getattr(owner, attr)
        undo.append((owner, attr, old))
        setattr(owner, attr, (wrapper or regions.wrap)(old, name))

    def forward_step(fn, name):
        timed = regions.wrap(fn, name)

        def inner(*args, **kwargs):
            logits, loss_func = timed(*args, **kwargs)
            return logits, regions.wrap(loss_func, "loss")
        return inner

    patch(rlp_step, "rlp_forward_step", "forward", forward_step)
    patch(schedules, "backward_step", "backward")
    patch(state.optimizer, "step", "optimizer")
    patch(update, "_all_finite", "optimizer")
    for c in {id(c.config): c.config for c in state.model_chunks}.values():
        if c.finalize_model_grads_func is not None:
            patch(c, "finalize_model_grads_func", "finalize")
    for m in state.policy.modules():
        core = getattr(m, "core_attention", None)
        if isinstance(core, torch.nn.Module):  # keep routing wrappers (instance attributes)
            undo.append((core, "forward", core.__dict__.get("forward", _CLASS)))
            core.forward = regions.wrap(core.forward, "forward/core_attention")
    return undo


_CLASS = object()  # "the attribute was the class's": undo deletes the instance's


def _undo(undo: list) -> None:
    for owner, attr, old in reversed(undo):
        if old is _CLASS:
            del owner.__dict__[attr]
        else:
            setattr(owner, attr, old)


def _family(name: str) -> str | None:
    for family, keys in FAMILIES:
        if any(k in name for k in keys):
            return family
    return None


def _op_split(prof) -> dict:
    """Operator self time (s) by family, in the forward (under region/forward or loss) and
    in the rest of the update (backward: autograd's thread-local ops, optimizer); and the 10
    costliest operators of the forward and of the backward (`top_ops`)."""
    out = {"forward": defaultdict(float), "backward": defaultdict(float),
           "optimizer": defaultdict(float), "other": defaultdict(float)}
    ops = {k: defaultdict(float) for k in out}
    for ev in prof.events():
        family = _family(ev.name)
        if family is None or ev.name.startswith("region/"):
            continue
        where, parent = "other", ev.cpu_parent
        while parent is not None:
            if parent.name in ("region/forward", "region/loss"):
                where = "forward"
                break
            if parent.name == "region/backward" or parent.name.startswith("autograd::engine"):
                where = "backward"
                break
            if parent.name == "region/optimizer":
                where = "optimizer"
                break
            parent = parent.cpu_parent
        if where == "other" and ev.thread != prof.events()[0].thread:
            where = "backward"  # autograd's worker thread
        out[where][family] += ev.self_cpu_time_total / 1e6
        ops[where][ev.name] += ev.self_cpu_time_total / 1e6
    res = {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in out.items()}
    res["top_ops"] = {k: dict(sorted(v.items(), key=lambda kv: -kv[1])[:10])
                      for k, v in ops.items() if k in ("forward", "backward")}
    return res


def _attention_alone(state, mbs, kind: str, repeats: int = 3) -> dict:
    """Forward and backward seconds of one layer's core attention on the update's first
    micro-batch (random q/k/v of its shapes), x layers: what the path costs by itself."""
    import torch

    from megatron_rlp.packing import split_attention
    from megatron_rlp.packing.tree import tree_mask

    mb = mbs[0]
    cores = [m.core_attention for m in state.policy.modules()
             if isinstance(getattr(m, "core_attention", None), torch.nn.Module)]
    core = cores[0]
    c = core.config
    heads, groups = c.num_attention_heads, c.num_query_groups or c.num_attention_heads
    n, s = mb["tokens"].shape
    hd = c.kv_channels
    mask = tree_mask(mb["branch"], mb["lo"], mb["hi"])
    if kind == "split":
        split_attention.route_core_attention(state.policy)
        split_attention.register_layout(mask, mb["branch"], mb["lo"], mb["hi"])
    q = torch.randn(s, n, heads, hd, requires_grad=True)
    k = torch.randn(s, n, groups, hd, requires_grad=True)
    v = torch.randn(s, n, groups, hd, requires_grad=True)
    upstream = torch.randn(s, n, heads * hd)
    fwd, bwd = [], []
    for _ in range(repeats + 1):  # CPU seconds of this thread
        start = time.thread_time()
        out = core(q, k, v, mask)
        mid = time.thread_time()
        out.backward(upstream)
        fwd.append(mid - start)
        bwd.append(time.thread_time() - mid)
    layers = len(cores)
    return {"forward_s": layers * min(fwd[1:]), "backward_s": layers * min(bwd[1:]),
            "layers": layers, "shape": [n, s, heads, groups, hd]}


@contextlib.contextmanager
def fixed_rollout(cfg):
    """Build the run's `TrainState` and draw one rollout; inside the block every `rlp_step`
    updates on that rollout (same micro-batches, forward step, Megatron schedule, DDP and
    optimizer; no new rollout). Yields (state, sampler, rollout, the update's FLOPs by
    `train/flops.py`'s model); restores `rollout_and_score` and shuts distributed down."""
    from megatron_rlp import distributed
    from megatron_rlp.train import rlp_step as step_module
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.flops import model_dims, step_flops
    from megatron_rlp.train.samplers import make_context_sampler

    rollout = step_module.rollout_and_score
    try:
        state = build_state(cfg)
        sampler = make_context_sampler(state)
        ro = rollout(state, sampler, 1)
        step_module.rollout_and_score = lambda *a, **k: ro  # every update on this rollout
        trace = {}
        step_module.record_step(1, ro, trace)
        yield state, sampler, ro, step_flops(model_dims(cfg, state.tokenizer.vocab_size),
                                             trace)["update"]
    finally:
        step_module.rollout_and_score = rollout
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    from bench_rlp import SIZES, matmul_flop_per_s, start_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("--size", choices=["config", *SIZES], default="25m")
    parser.add_argument("--steps", type=int, default=3, help="timed updates per path")
    parser.add_argument("--attention", nargs="+", default=["mask", "split"],
                        help="model.packed_attention paths to profile")
    parser.add_argument("--out", default="runs/bench/profile_update.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value, after the defaults")
    args = parser.parse_args(argv)

    cfg = start_bench(args)
    if cfg is None:
        return 2
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_rlp.train import rlp_step as step_module
    from megatron_rlp.train.rlp_update import packed_microbatches
    from megatron_rlp.train.timers import PhaseTimer

    with fixed_rollout(cfg) as (state, sampler, ro, flop):
        configs = {kind: dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, packed_attention=kind)) for kind in args.attention}

        cpu_s = {k: [] for k in args.attention}

        def update(kind: str) -> float:
            state.cfg = configs[kind]
            start, cpu = time.perf_counter(), time.thread_time()
            step_module.rlp_step(state, sampler, PhaseTimer())
            cpu_s[kind].append(time.thread_time() - cpu)  # without waits for a core
            return time.perf_counter() - start

        for kind in args.attention:
            update(kind)  # warm-up
        walls = {k: [] for k in args.attention}
        regions = {k: [] for k in args.attention}
        for _ in range(args.steps):
            for kind in args.attention:
                reg = Regions()
                undo = _instrument(reg, state)
                try:
                    walls[kind].append(update(kind))
                finally:
                    _undo(undo)
                regions[kind].append(dict(reg.seconds))
        out = {}
        for kind in args.attention:
            reg = Regions()
            undo = _instrument(reg, state)
            try:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    profiled = update(kind)
            finally:
                _undo(undo)
            ops = _op_split(prof)
            state.cfg = configs[kind]
            mbs = packed_microbatches(configs[kind], state.tokenizer, ro, 1, equal_width=False)
            # the regions of the median update (so that they add up to its CPU time)
            timed = cpu_s[kind][1:args.steps + 1]
            mid = sorted(range(args.steps), key=timed.__getitem__)[args.steps // 2]
            med = {name: regions[kind][mid].get(name, 0.0)
                   for name in ("forward", "forward/core_attention", "loss", "backward",
                                "finalize", "optimizer")}
            wall = statistics.median(walls[kind])
            med["rest"] = timed[mid] - sum(v for k, v in med.items()
                                           if k != "forward/core_attention")
            op_total = sum(sum(v.values()) for k, v in ops.items() if k != "top_ops")
            out[kind] = {
                "update_s": stats(walls[kind]), "regions_s": med,
                "update_cpu_s": stats(cpu_s[kind][1:args.steps + 1]),  # the timed ones
                "profiled": {"wall_s": profiled, "op_self_s": ops,
                             "python_dispatch_s": profiled - op_total},
                "attention_alone": _attention_alone(state, mbs, kind),
                "update_flop": flop, "update_flop_per_s": flop / wall,
                "update_flop_per_cpu_s": flop / statistics.median(cpu_s[kind][1:args.steps + 1]),
                "micro_batches": [list(mb["tokens"].shape) for mb in mbs],
            }
    res = {"paths": out, "matmul_flop_per_s": matmul_flop_per_s(),
           "thought_len": float(ro.thoughts.lengths.float().mean()),
           "rows": len(ro.thoughts.tokens),
           "run": {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                   "steps": args.steps, "config": cfg.to_dict()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    mm = res["matmul_flop_per_s"]
    for kind, p in out.items():
        r, a = p["regions_s"], p["attention_alone"]
        print(f"[profile_update] {kind:6s} update {p['update_s']['median']:.2f}s wall, "
              f"{p['update_cpu_s']['median']:.2f}s CPU = forward "
              f"{r['forward']:.2f} (core attention {r['forward/core_attention']:.2f}) + loss "
              f"{r['loss']:.2f} + backward {r['backward']:.2f} + finalize {r['finalize']:.2f} + "
              f"optimizer {r['optimizer']:.2f} + rest {r['rest']:.2f} | core attention alone "
              f"fwd {a['forward_s']:.2f}s bwd {a['backward_s']:.2f}s | "
              f"{p['update_flop_per_s'] / 1e9:.1f} GFLOP/s, per CPU second "
              f"{p['update_flop_per_cpu_s'] / 1e9:.1f} (plain matmul {mm / 1e9:.1f})")
        for where, fam in p["profiled"]["op_self_s"].items():
            if where == "top_ops":
                continue
            print(f"[profile_update] {kind:6s}   {where:9s} " + ", ".join(
                f"{k} {v:.2f}s" for k, v in fam.items()))
        print(f"[profile_update] {kind:6s}   python/dispatch "
              f"{p['profiled']['python_dispatch_s']:.2f}s of {p['profiled']['wall_s']:.2f}s "
              "profiled")
    return 0


def stats(values: list[float]) -> dict[str, float]:
    """Median, min, max and every value of a list of timings."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": values}


if __name__ == "__main__":
    sys.exit(main())
