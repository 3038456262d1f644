"""RLP step: naive path vs shared-prefix path (and a transformers yardstick), in one process.

    python tools/bench_rlp.py --out runs/bench/rlp_paths.json
    python tools/bench_rlp.py --hf --size 25m --out runs/bench/rlp_hf_25m.json \
        rlp.positions_per_document=1 rlp.group_size=4 rlp.min_prefix_tokens=160 \
        rlp.max_prefix_tokens=160
    python tools/bench_rlp.py --models --out docs/bench/rlp_models_moe.json \
        device.num_threads=1

`--models`: the tiny dense, MoE, hybrid and hybrid-MoE models at equal active parameters,
one step each in turn, side by side (tools/bench_rlp_models.py); the rest of this docstring
is the default mode.

Defaults: the tiny model (examples/configs/tiny_cpu.yaml), 8 contexts from one document
(8 positions per document), G=8, 256-token windows (max_prefix 144, min_prefix 32: each
position keeps its full 144-token prefix, and the window opening 144 tokens before the
first position spans at most 144 + 112 = 256 tokens), 32-token thoughts, lr 1e-7 (so the
random policy keeps thinking to the budget on every timed step). Two `TrainState`s are
built from the same config and seed (identical weights); every step runs

    naive      rlp.share_prefixes=false: a prefill per context (its KV copied G ways), one
               update sequence per thought (the prefix recomputed with gradients G times)
    optimised  rlp.share_prefixes=true: one prefill per document window, branch-packed update
    optimised_<attention>  (--also-attention mask ...) the same with another
               `model.packed_attention` (`mask`: the dense tree mask, the update before
               `split` became the CPU default); --skip-naive leaves the naive path out
    hf         (--hf) tools/bench_rlp_hf.py: transformers `generate` per row, separate
               scoring and update forwards, same model dimensions; --hf-batched: one
               `generate` over all rows (a stronger yardstick)
    speed      (--speed KEY=VALUE, repeatable) the optimised path with the overrides a user
               would pick for speed on top, e.g. rlp.compile_decode=true,
               rlp.teacher_scoring=log_interval; its untimed warm-up steps (`--warmup`) hold
               the graph compilations, reported apart (`warmup_steps`, `decode_compiles`;
               --cold-compile starts inductor's cache empty, as a first run does)

on the same contexts, the paths' order rotating from step to step so that machine load
(other users of a shared CPU) hits them alike. It checks that naive and optimised draw
identical thoughts and rewards and reach the same loss, and writes JSON: per-phase seconds,
tokens/s, peak memory, the speed-ups, and a FLOP model of the step (`flop_model`) giving
achieved FLOP/s (and MFU with --peak-tflops on a GPU). `packed_attention` holds the block
sparsity of the optimised path's packed update (tiles FlexAttention skips at
`--block-size`, tools/bench_packed_attention.py) and, on CUDA only, the time of that update
with the explicit-mask and the FlexAttention core attention (`model.packed_attention`).

Speed targets live here, never in timed tests. On a shared machine compare the ratios of
one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_meters import DecodeMeter, PeakMemory, matmul_flop_per_s  # noqa: E402,F401

DEFAULTS = ("rlp.contexts_per_step=8", "rlp.positions_per_document=8", "rlp.group_size=8",
            "rlp.min_prefix_tokens=32", "rlp.max_prefix_tokens=144", "rlp.max_thought_tokens=32",
            "model.max_sequence_length=512",
            # A learning random policy shortens its thoughts within two steps (32 -> ~2
            # tokens at lr 3e-4); a tiny lr keeps every timed step at the stated shape.
            "optimizer.lr=1e-7")
SIZES = {  # the yardstick sizes: (layers, hidden, ffn, heads, query groups)
    "0.8m": (4, 128, 384, 4, 2),
    "25m": (8, 512, 1536, 8, 4),
}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values)}


def _compare(a: dict, b: dict) -> dict:
    """Naive vs optimised trace of one step: thoughts, rewards, S_pred."""
    ta, tb = a["thoughts"], b["thoughts"]
    same_tokens = bool((ta.tokens == tb.tokens).all() and (ta.mask == tb.mask).all())
    return {
        "identical_thoughts": same_tokens,
        "thought_rows_differing": int((ta.tokens != tb.tokens).any(1).sum()),
        "rewards_max_abs_diff": float((a["rewards"] - b["rewards"]).abs().max()),
        "s_pred_max_abs_diff": float((ta.s_pred - tb.s_pred).abs().max()),
        "advantages_max_abs_diff": float((a["advantages"] - b["advantages"]).abs().max()),
        "loss_abs_diff": abs(a["loss"] - b["loss"]),
    }


def _packed_attention(cfg, state, trace: dict, block_size: int) -> dict | None:
    """Block sparsity of the optimised path's packed update of one step (`trace`); on CUDA
    also flex vs mask time of that update (tools/bench_packed_attention.py)."""
    import torch
    from bench_packed_attention import sparsity_report, time_attention

    from megatron_rlp.packing.flex import resolve
    from megatron_rlp.packing.update import packable, packed_update_batches

    r, tok = cfg.rlp, state.tokenizer
    th = trace["thoughts"]
    if not packable(cfg.model.hybrid_layer_pattern, r.positions_per_document * r.group_size,
                    len(th.tokens), cfg.train.micro_batch_size):
        return None
    attention = resolve(cfg.model.packed_attention, cfg.device.type,
                        cfg.model.hybrid_layer_pattern)
    mbs = packed_update_batches(trace["windows"], trace["prompts"], th, trace["advantages"],
                                r.group_size, cfg.train.micro_batch_size, tok.pad,
                                tok.think_start, equal_width=False, model_cfg=cfg.model,
                                block_sparse=attention in ("flex", "split"))  # the optimised path's
    out = {"sparsity": sparsity_report(mbs, block_size)}
    if torch.cuda.is_available() and cfg.device.type == "cuda":
        out.update(time_attention(state.policy, mbs, tok.vocab_size))
    return out


def bench_config(config: str | None, size: str, overrides: list[str]):
    """The bench's config: `DEFAULTS`, then a yardstick model of `SIZES` (unless `size` is
    "config"), then the caller's overrides. Raises ConfigError with the one-line message."""
    from megatron_rlp.startup import load_config

    shape = ()
    if size != "config":
        layers, hidden, ffn, heads, groups = SIZES[size]
        shape = (f"model.hybrid_layer_pattern={'*-' * layers}", f"model.hidden_size={hidden}",
                 f"model.ffn_hidden_size={ffn}", f"model.num_attention_heads={heads}",
                 f"model.num_query_groups={groups}")
    return load_config(config, DEFAULTS + shape + tuple(overrides), world_size=1)


def start_bench(args):
    """The start shared by the benches and profilers (bench_decode, profile_rollout,
    profile_update): the config of `args.config`, `args.size` and `args.overrides`
    (`bench_config`; a bad one prints its one line and gives None), import-time warnings
    quietened, Megatron imported before the CPU backend, and this one-rank run's process
    groups started (`megatron_rlp.distributed.shutdown()` ends them)."""
    from megatron_rlp.config import ConfigError

    try:
        cfg = bench_config(args.config, args.size, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import megatron_rlp.train.loop  # noqa: F401  (Megatron imports before the CPU backend)
    from megatron_rlp import distributed

    distributed.initialize(cfg)
    return cfg


def run(cfg, steps: int, warmup: int, with_hf: str | None, peak_tflops: float | None,
        block_size: int = 128, naive: bool = True, also_attention: tuple[str, ...] = (),
        speed_cfg=None) -> dict:
    """`speed_cfg`: the config of the `speed` path (the bench's, plus `--speed` overrides)."""
    import dataclasses

    from megatron_rlp.packing.compiled import compile_count
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.flops import model_dims, step_flops
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    variants = {}
    paths = [("naive", False, None)] if naive else []
    paths += [("optimised", True, None)]
    paths += [(f"optimised_{kind}", True, kind) for kind in also_attention]
    paths += [("speed", None, None)] if speed_cfg is not None else []
    for name, share, attention in paths:
        base = cfg if share is not None else speed_cfg
        share = base.rlp.share_prefixes if share is None else share
        # The optimised path measures cascade decode (auto turns it on only on cuda).
        cascade = base.rlp.cascade_decode if base.rlp.cascade_decode is not None else share
        model = base.model if attention is None else dataclasses.replace(
            base.model, packed_attention=attention)  # e.g. `mask`: the update before `split`
        c = dataclasses.replace(base, model=model, rlp=dataclasses.replace(
            base.rlp, share_prefixes=share, cascade_decode=cascade))
        state = build_state(c)
        variants[name] = (state, make_context_sampler(state))
    first = next(iter(variants))  # the reference of the equality checks (naive if run)
    hf = None
    if with_hf:
        from bench_rlp_hf import HFRLPStep

        hf = HFRLPStep(cfg, variants[first][0].tokenizer, batched=with_hf == "batched")
    dims = model_dims(cfg, variants[first][0].tokenizer.vocab_size)

    names = list(variants) + (["hf"] if hf else [])
    results = {n: [] for n in names}
    warm = {n: [] for n in names}  # untimed steps: compilation (rlp.compile_decode) shows here
    checks = []
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[:i % len(names)]
        traces = {}
        for name in order:
            timer, trace = PhaseTimer(cpu=True), {}  # wall and CPU seconds per phase
            with PeakMemory() as mem, DecodeMeter() as meter:
                compiles = compile_count()
                start, cpu = time.perf_counter(), time.thread_time()
                if name == "hf":
                    state, sampler = variants[first]
                    from megatron_rlp.data.batches import build_rlp_inputs
                    from megatron_rlp.train.rlp_step import local_contexts

                    contexts, ids = local_contexts(state, sampler, i + 1)
                    prompts, _ = build_rlp_inputs(contexts, ids, state.corpus,
                                                  cfg.rlp.max_prefix_tokens, state.tokenizer.pad)
                    metrics = hf.step(prompts, timer, cfg.train.seed + i)
                else:
                    state, sampler = variants[name]
                    metrics = rlp_step(state, sampler, timer, trace)
                seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
            traces[name] = {**trace, "loss": metrics["loss"]}
            compiles = compile_count() - compiles
            if i < warmup:
                warm[name].append({"step": seconds, "step_cpu": cpu, **timer.pop(),
                                   "decode_compiles": compiles})
            else:
                row = {"step": seconds, "step_cpu": cpu, **timer.pop(), "peak_bytes": mem.bytes,
                       "tokens": metrics["tokens"], "thought_len": metrics["thought_len"],
                       "decode_compiles": compiles,
                       "teacher_scored": metrics.get("teacher_scored", 1.0)}
                decoded = metrics["thought_len"] * cfg.rlp.contexts_per_step * cfg.rlp.group_size
                row["decoded_tokens_per_s"] = decoded / row["rollout"]
                if name == "hf":
                    row["decode_ms_per_step"] = 1e3 * hf.decode_seconds / max(hf.decode_steps, 1)
                    hf.decode_seconds, hf.decode_steps = 0.0, 0
                else:
                    row["decode_ms_per_step"] = 1e3 * meter.seconds / max(meter.steps, 1)
                    row["rollout_cache_bytes"] = meter.cache_bytes
                if name != "hf":
                    row["flops"] = step_flops(dims, trace)
                    # what the contexts read (a position's prefix spans its document's
                    # window up to it, data/contexts.py): mean prefix and window tokens
                    row["prefix_len"] = float(trace["prompts"].lengths.float().mean())
                    row["window_len"] = float(trace["windows"].valid.sum(1).float().mean())
                results[name].append(row)
        for name in variants:
            if name != first:
                checks.append({"step": i + 1, "path": name, "against": first,
                               **_compare(traces[first], traces[name])})

    out = {"paths": {}, "checks": checks, "hf_variant": with_hf,
           "packed_attention": _packed_attention(cfg, variants["optimised"][0],
                                                 traces["optimised"], block_size)}
    for name, rows in results.items():
        phases = {k: _summary([r[k] for r in rows]) for k in ("step", "rollout", "scoring",
                                                               "update")}
        step_s = sum(r["step"] for r in rows)
        entry = {
            "phases_s": phases,
            # this thread's CPU seconds: what a quiet core would take (PhaseTimer(cpu=True))
            "phases_cpu_s": {k: _summary([r[f"{k}_cpu"] for r in rows])
                             for k in ("step", "rollout", "scoring", "update")},
            "decode_ms_per_step": _summary([r["decode_ms_per_step"] for r in rows]),
            "decoded_tokens_per_s": _summary([r["decoded_tokens_per_s"] for r in rows]),
            "rollout_cache_bytes": max(r.get("rollout_cache_bytes", 0) for r in rows) or None,
            "tokens_per_s": sum(r["tokens"] for r in rows) / step_s,
            "peak_memory_bytes": max(r["peak_bytes"] for r in rows),
            "thought_len": statistics.fmean(r["thought_len"] for r in rows),
            "per_step": rows,  # raw seconds per phase, tokens, FLOPs of every timed step
            # untimed first steps (wall and CPU s per phase, graph compilations): what
            # rlp.compile_decode costs once, reported apart from the timed steps
            "warmup_steps": warm[name],
            "decode_compiles": sum(r["decode_compiles"] for r in warm[name] + rows),
        }
        if "flops" in rows[0]:
            total = {k: sum(r["flops"][k] for r in rows) for k in rows[0]["flops"]}
            entry["flop_model"] = {k: v / len(rows) for k, v in total.items()}
            entry["achieved_flop_per_s"] = total["step"] / step_s
            entry["update_flop_per_s"] = total["update"] / sum(r["update"] for r in rows)
            if peak_tflops:
                entry["mfu"] = entry["achieved_flop_per_s"] / (peak_tflops * 1e12)
        out["paths"][name] = entry
    med = {n: out["paths"][n]["phases_s"]["step"]["median"] for n in names}
    out["speedup"] = {f"optimised_vs_{n}": med[n] / med["optimised"]
                      for n in variants if n != "optimised"}
    if hf:
        for n in variants:
            out["speedup"][f"{n}_vs_hf"] = med["hf"] / med[n]
        roll = {n: out["paths"][n]["phases_s"]["rollout"]["median"] for n in names}
        for n in ("optimised", "speed")[:1 + (speed_cfg is not None)]:
            out["speedup"][f"rollout_{n}_vs_hf"] = roll["hf"] / roll[n]
    cpu = {n: out["paths"][n]["phases_cpu_s"]["step"]["median"] for n in names}
    out["speedup_cpu"] = {f"optimised_vs_{n}": cpu[n] / cpu["optimised"]
                          for n in variants if n != "optimised"}
    if hf:
        for n in variants:
            out["speedup_cpu"][f"{n}_vs_hf"] = cpu["hf"] / cpu[n]
        roll = {n: out["paths"][n]["phases_cpu_s"]["rollout"]["median"] for n in names}
        for n in ("optimised", "speed")[:1 + (speed_cfg is not None)]:
            out["speedup_cpu"][f"rollout_{n}_vs_hf"] = roll["hf"] / roll[n]
    out["matmul_flop_per_s"] = matmul_flop_per_s()  # same process, same thread count
    for entry in out["paths"].values():  # the update's rate as a share of a plain matmul's
        if "update_flop_per_s" in entry:
            entry["update_vs_matmul"] = entry["update_flop_per_s"] / out["matmul_flop_per_s"]
            entry["update_flop_per_cpu_s"] = entry["flop_model"]["update"] / entry[
                "phases_cpu_s"]["update"]["median"]
    out["equal"] = {
        "identical_thoughts_all_steps": all(c["identical_thoughts"] for c in checks),
        # the speed path's rewards lack S_ema where its teacher does not score
        # (rlp.teacher_scoring); its advantages, hence loss and update, are the same
        "max_reward_abs_diff": max((c["rewards_max_abs_diff"] for c in checks
                                    if c["path"] != "speed"), default=0.0),
        "max_advantage_abs_diff": max((c["advantages_max_abs_diff"] for c in checks),
                                      default=0.0),
        "max_loss_abs_diff": max((c["loss_abs_diff"] for c in checks), default=0.0),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    parser.add_argument("--size", choices=["config", *SIZES], default="config",
                        help="model dimensions: the config's, or a yardstick size")
    parser.add_argument("--hf", action="store_true", help="also run the transformers step "
                        "(`generate` per row)")
    parser.add_argument("--hf-batched", action="store_true", help="the transformers step with "
                        "one batched `generate` over all rows instead")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak (dense, the run's dtype) for MFU")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive path "
                        "(the equality checks then compare the optimised variants)")
    parser.add_argument("--also-attention", nargs="*", default=[], choices=["mask", "split",
                        "flex"], help="also run the optimised path with these "
                        "model.packed_attention values (paths optimised_<value>)")
    parser.add_argument("--speed", action="append", default=[], metavar="KEY=VALUE",
                        help="also run the path `speed`: the optimised path with this override "
                        "on top (repeatable), e.g. --speed rlp.compile_decode=true --speed "
                        "rlp.teacher_scoring=log_interval --speed train.log_interval=10")
    parser.add_argument("--cold-compile", action="store_true", help="a fresh, empty inductor "
                        "cache for this run (TORCHINDUCTOR_CACHE_DIR), so that the warm-up "
                        "steps show a first run's compile time")
    parser.add_argument("--block-size", type=int, default=128,
                        help="FlexAttention tile for the packed update's block sparsity")
    parser.add_argument("--models", action="store_true", help="time the tiny dense, MoE, "
                        "hybrid and hybrid-MoE models side by side instead (--config, --size "
                        "and --hf unused)")
    parser.add_argument("--out", default="runs/bench/rlp_paths.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value, after the defaults")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2

    if args.cold_compile:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_rlp_inductor_")
    from megatron_rlp.config import ConfigError

    try:
        cfg = bench_config(args.config, args.size, args.overrides)
        speed_cfg = (bench_config(args.config, args.size, [*args.overrides, *args.speed])
                     if args.speed else None)
        if args.models:
            import bench_rlp_models

            cfgs = bench_rlp_models.configs(DEFAULTS, args.overrides)
            cfg = cfgs["dense"]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import megatron_rlp.train.loop  # noqa: F401  (Megatron imports before the CPU backend)
    from megatron_rlp import distributed

    distributed.initialize(cfg)
    try:
        hf = "batched" if args.hf_batched else "per-row" if args.hf else None
        res = (bench_rlp_models.run(cfgs, args.steps, args.warmup) if args.models else
               run(cfg, args.steps, args.warmup, hf, args.peak_tflops, args.block_size,
                   naive=not args.skip_naive, also_attention=tuple(args.also_attention),
                   speed_cfg=speed_cfg))
    finally:
        distributed.shutdown()
    import torch

    res["run"] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                  else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                  "command": " ".join(sys.argv), "steps": args.steps, "warmup": args.warmup,
                  "speed": args.speed, "cold_compile": args.cold_compile,
                  "load_average": os.getloadavg(),
                  "config": ({n: c.to_dict() for n, c in cfgs.items()} if args.models
                             else cfg.to_dict())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.models:
        print(bench_rlp_models.report(res), flush=True)
        return 0
    for name, p in res["paths"].items():
        ph = p["phases_s"]
        print(f"[bench_rlp] {name:9s} step {ph['step']['median']:.3f}s | rollout "
              f"{ph['rollout']['median']:.3f}s | scoring {ph['scoring']['median']:.3f}s | "
              f"update {ph['update']['median']:.3f}s | {p['tokens_per_s']:.0f} tok/s | "
              f"decode {p['decode_ms_per_step']['median']:.2f} ms/step, "
              f"{p['decoded_tokens_per_s']['median']:.0f} decoded tok/s | "
              + (f"cache {p['rollout_cache_bytes'] / 2**20:.1f} MiB | "
                 if p["rollout_cache_bytes"] else "")
              + (f"update {p['update_flop_per_s'] / 1e9:.2f} GFLOP/s "
                 f"({100 * p['update_vs_matmul']:.0f}% of a matmul) | "
                 if "update_flop_per_s" in p else "")
              + (f"step {p['achieved_flop_per_s'] / 1e9:.2f} GFLOP/s | " if "achieved_flop_per_s"
                 in p else "") + f"peak +{p['peak_memory_bytes'] / 2**20:.0f} MiB")
        if p["warmup_steps"]:
            print(f"[bench_rlp] {name:9s} warm-up (untimed) steps: " + ", ".join(
                f"{w['step']:.2f}s wall / {w['step_cpu']:.2f}s CPU" for w in p["warmup_steps"])
                + f" | graphs compiled {p['decode_compiles']}")
    pa = res["packed_attention"]
    if pa:
        print(f"[bench_rlp] packed update: block sparsity {pa['sparsity']['block']:.3f} at "
              f"{pa['sparsity']['block_size']} (pair {pa['sparsity']['pair']:.3f})"
              + (f" | flex {pa['seconds']['flex']:.4f}s vs mask {pa['seconds']['mask']:.4f}s"
                 if "seconds" in pa else " | flex vs mask timed on CUDA only"))
    print(f"[bench_rlp] plain fp32 matmul on this thread: {res['matmul_flop_per_s'] / 1e9:.2f} "
          "GFLOP/s")
    print("[bench_rlp] speed-up " + ", ".join(f"{k} {v:.2f}x" for k, v in res["speedup"].items())
          + f" | equal {res['equal']}")
    print("[bench_rlp] speed-up in CPU seconds of each path's thread " + ", ".join(
        f"{k} {v:.2f}x" for k, v in res["speedup_cpu"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
