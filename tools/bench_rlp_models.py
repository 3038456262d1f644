"""Step time of the tiny models side by side: dense, MoE, hybrid and hybrid MoE at equal
active parameters (`tools/bench_rlp.py --models`).

    python tools/bench_rlp.py --models --steps 3 --out docs/bench/rlp_models_moe.json \
        device.num_threads=1

The four shipped tiny configs, each with bench_rlp's defaults and the caller's overrides on top:

    dense       tiny_cpu.yaml             `*-*-*-*-`, SwiGLU FFN 768
    moe         tiny_moe_cpu.yaml         `*E*E*E*E`, 8 experts of 384, top-2: 2 x 384 = 768
    hybrid      tiny_hybrid_cpu.yaml      `M-M*-M-`, squared-ReLU FFN 1024
    hybrid-moe  tiny_hybrid_moe_cpu.yaml  `MEM*EME`, 8 experts of 256, top-2, + a shared
                                          expert of 512: 2 x 256 + 512 = 1024

so a token runs through as many FFN weights in an MoE layer as in the dense MLP it replaces
(the active counts differ by the routers' hidden x experts weights only). Every model's
`TrainState` is built first, then each timed step runs every model once, the order rotating
from step to step so machine load hits them alike; each runs the optimised path
(`rlp.share_prefixes=true`, cascade decode) as training does. The parameter counts come
from the built models: total, and active = total - the routed experts not in a token's top-k.

Why not inside bench_rlp.run: that compares two paths of one model on the same contexts
and checks their equality; here the models differ, so only times and counts are compared.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"dense": "tiny_cpu.yaml", "moe": "tiny_moe_cpu.yaml",
          "hybrid": "tiny_hybrid_cpu.yaml", "hybrid-moe": "tiny_hybrid_moe_cpu.yaml"}


def configs(defaults: tuple[str, ...], overrides: list[str]) -> dict:
    """Model name -> its RunConfig (bench defaults, then `overrides`), one rank, optimised
    path. Raises ConfigError with the one-line message."""
    from megatron_rlp.startup import load_config

    out = {}
    for name, file in MODELS.items():
        cfg = load_config(str(ROOT / "examples/configs" / file), defaults + tuple(overrides),
                          world_size=1)
        cascade = True if cfg.rlp.cascade_decode is None else cfg.rlp.cascade_decode
        out[name] = dataclasses.replace(cfg, rlp=dataclasses.replace(
            cfg.rlp, share_prefixes=True, cascade_decode=cascade))
    return out


def parameter_counts(model, model_cfg) -> dict[str, int]:
    """Total parameters of a built model and the active ones: a token reaches `topk` of each
    MoE layer's `num_experts` routed experts (equal-sized: Megatron's SequentialMLP)."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    unused = 0
    if model_cfg.num_experts:
        unused = routed * (model_cfg.num_experts - model_cfg.moe_router_topk) \
            // model_cfg.num_experts
    return {"total": total, "active": total - unused, "routed_experts": routed}


def run(cfgs: dict, steps: int, warmup: int) -> dict:
    """Build every model, then `warmup + steps` rounds of one RLP step per model; per model
    the phases' seconds (median, min, max over the timed steps) and parameter counts."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    states = {}
    for name, cfg in cfgs.items():
        state = build_state(cfg)
        states[name] = (state, make_context_sampler(state))
    rows = {name: [] for name in cfgs}
    names = list(cfgs)
    for i in range(warmup + steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            state, sampler = states[name]
            # Megatron's process-global router-loss tracker is sized by one model's layers.
            destroy_moe_metrics_tracker()
            timer = PhaseTimer()
            start = time.perf_counter()
            metrics = rlp_step(state, sampler, timer)
            seconds = time.perf_counter() - start
            if i >= warmup:
                rows[name].append({"step": seconds, **timer.pop(), "tokens": metrics["tokens"],
                                   "thought_len": metrics["thought_len"],
                                   "routing_agreement": metrics.get("routing_agreement")})
    out = {}
    for name, (state, _) in states.items():
        r = rows[name]
        out[name] = {
            "config": f"examples/configs/{MODELS[name]}",
            "pattern": state.cfg.model.hybrid_layer_pattern,
            "parameters": parameter_counts(state.policy, state.cfg.model),
            "phases_s": {k: {"median": statistics.median(x[k] for x in r),
                             "min": min(x[k] for x in r), "max": max(x[k] for x in r)}
                         for k in ("step", "rollout", "scoring", "update")},
            "tokens_per_s": sum(x["tokens"] for x in r) / sum(x["step"] for x in r),
            "thought_len": statistics.fmean(x["thought_len"] for x in r),
            "per_step": r,
        }
    # On a shared machine the fastest step is the least disturbed one: both ratios are kept.
    dense = out["dense"]["phases_s"]["step"]
    for entry in out.values():
        step = entry["phases_s"]["step"]
        entry["step_vs_dense"] = step["median"] / dense["median"]
        entry["step_vs_dense_min"] = step["min"] / dense["min"]
    return {"models": out}


def report(res: dict) -> str:
    """One line per model."""
    lines = []
    for name, m in res["models"].items():
        ph, p = m["phases_s"], m["parameters"]
        agree = m["per_step"][-1]["routing_agreement"]
        lines.append(
            f"[bench_rlp] {name:10s} {p['active'] / 1e6:.3f}M active of {p['total'] / 1e6:.3f}M"
            f" | step {ph['step']['median']:.3f}s ({m['step_vs_dense']:.2f}x dense), min "
            f"{ph['step']['min']:.3f}s ({m['step_vs_dense_min']:.2f}x) | rollout "
            f"{ph['rollout']['median']:.3f}s | scoring {ph['scoring']['median']:.3f}s | update "
            f"{ph['update']['median']:.3f}s | {m['tokens_per_s']:.0f} tok/s"
            + (f" | routing_agreement {agree:.4f}" if agree is not None else ""))
    return "\n".join(lines)
