"""One stage of tools/gpu_check.py in its own process: RLP steps of one config, recorded.

    python tools/gpu_check_step.py record --config examples/configs/tiny_cpu.yaml \
        --steps 1 --out step.json device.type=cuda precision.params_dtype=fp32
    python tools/gpu_check_step.py measure --config examples/configs/qwen3_1p7b.yaml \
        --out measure.json device.type=cuda ...

`record` runs `--steps` RLP steps with the trainer's own `rlp_step` (one rank) and writes:
- `run`: what actually ran: device name, dtype, torch version, the layer implementation
  (`model.transformer_impl` resolved), the packed update's core attention
  (`model.packed_attention` resolved), the Mamba kernels (mamba-ssm's, or the project's torch
  ops when `models.mamba.adapter` had to stand in), TF32 switches;
- `steps`: every step's metrics (loss, grad_norm, s_ema, s_pred, reward_mean, skipped, ...);
- `record`: step 1 row by row, from the step's own record (`MEGATRON_RLP_RECORD`,
  train/record.py): context ids, thought tokens and mask, closed flags, S_ema [B], S_pred [R],
  sampling log-probs [R, L], rewards, advantages;
- `params`: the parameters after step 1 against theta_0, per tensor (`param_fingerprint`).

With `--write-reference` the same JSON is the shipped CPU fp32 reference
(docs/gpu/reference/, compared by tools/gpu_check_compare.py).

`measure` runs one untimed and one timed step of a large shape and writes the phase seconds,
the decoded and the *computed* update tokens (`computed_update_work`) and peak memory, for the
roofline and MFU of tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SAMPLE = 256  # sampled elements per tensor in the parameter fingerprint


def sample_index(n: int, k: int = SAMPLE) -> torch.Tensor:
    """min(n, k) evenly spread element indices of a flattened tensor of n elements
    (floor((j + 1/2) n / k)): no random generator, the same under every torch version."""
    k = min(n, k)
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)


def param_fingerprint(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor],
                      lr: float) -> dict[str, dict]:
    """Per tensor, in float64: `n` elements, `norm` = ||theta_1||_2, and the update
    delta = theta_1 - theta_0 in units of the learning rate: `update_l1` = mean |delta| / lr
    over the tensor, `sample` = delta / lr at `sample_index(n)` (5 decimals).

    Adam's first step moves an element by ~lr * sign(grad) (+ weight decay), so a sampled
    value is ~+-1: a wrong gradient flips about half of the signs, while GPU-vs-CPU rounding
    flips only the rare gradients that are ~0 (tools/gpu_check_compare.py allows 2%)."""
    out = {}
    for name, t1 in theta1.items():
        a, b = theta0[name].double().flatten(), t1.double().flatten()
        delta = (b - a) / lr
        out[name] = {"n": b.numel(), "norm": float(b.norm()),
                     "update_l1": float(delta.abs().mean()),
                     "sample": [round(v, 5) for v in delta[sample_index(b.numel())].tolist()]}
    return out


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and "_extra_state" not in k}


def what_ran(cfg) -> dict:
    """The spec, kernels and attention path this process used (after `build_state`)."""
    from megatron.core.ssm import mamba_mixer

    from megatron_rlp.backends.transformer_engine import resolve_transformer_impl
    from megatron_rlp.models.mamba.adapter import torch_kernels_installed
    from megatron_rlp.packing.flex import resolve as resolve_packed_attention

    try:
        import transformer_engine.pytorch  # noqa: F401
        have_te = True
    except Exception:  # noqa: BLE001 - any failure means TE layers cannot run
        have_te = False
    pattern = cfg.model.hybrid_layer_pattern
    kernels = None
    if "M" in pattern:
        scan = getattr(mamba_mixer, "mamba_chunk_scan_combined", None)
        kernels = {"source": "torch ops (megatron_rlp.models.mamba.ops)"
                   if torch_kernels_installed() else "mamba_ssm",
                   "chunk_scan": f"{getattr(scan, '__module__', None)}."
                                 f"{getattr(scan, '__name__', None)}"}
    cuda = cfg.device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": cfg.precision.params_dtype, "torch": torch.__version__,
        "transformer_impl": resolve_transformer_impl(cfg.model.transformer_impl,
                                                     cfg.device.type, have_te),
        "packed_attention": resolve_packed_attention(cfg.model.packed_attention,
                                                     cfg.device.type, pattern),
        "mamba_kernels": kernels, "pattern": pattern,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
    }


def _start(config: str, overrides: list[str]):
    from megatron_rlp import distributed
    from megatron_rlp.startup import load_config
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.samplers import make_context_sampler

    cfg = load_config(config, tuple(overrides), world_size=1)
    if cfg.device.type == "cuda" and cfg.precision.params_dtype == "fp32":
        # fp32 means fp32 here: TF32 would round matmul/conv inputs to 10 mantissa bits.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    distributed.initialize(cfg)
    state = build_state(cfg)
    return cfg, state, make_context_sampler(state)


def _record_rows(rec: dict) -> dict:
    mask = rec["thought_mask"]
    return {
        "context_ids": rec["context_ids"].tolist(), "doc_index": rec["doc_index"].tolist(),
        "position": rec["position"].tolist(), "thought_tokens": rec["thought_tokens"].tolist(),
        "thought_mask": mask.int().tolist(), "closed": rec["closed"].int().tolist(),
        "s_ema": rec["s_ema"].double().tolist(), "s_pred": rec["s_pred"].double().tolist(),
        "logprobs": torch.where(mask, rec["thought_logprobs"], 0.0).double().tolist(),
        "rewards": rec["rewards"].double().tolist(),
        "advantages": rec["advantages"].double().tolist(),
    }


def record(args) -> dict:
    from megatron_rlp.models.provider import unwrap_model
    from megatron_rlp.train.record import ENV
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.timers import PhaseTimer

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[ENV] = tmp
        cfg, state, sampler = _start(args.config, args.overrides)
        theta0 = _weights(unwrap_model(state.policy))
        steps, params, rec = [], None, None
        for k in range(1, args.steps + 1):
            metrics = rlp_step(state, sampler, PhaseTimer())
            steps.append({"step": k, **metrics})
            if k == 1:
                params = param_fingerprint(theta0, _weights(unwrap_model(state.policy)),
                                           cfg.optimizer.lr)
                rec = _record_rows(torch.load(Path(tmp) / "step_000001_rank00000.pt"))
        os.environ.pop(ENV)
    return {"config": args.config, "overrides": args.overrides, "run": what_ran(cfg),
            "steps": steps, "record": rec, "params": params}


def computed_update_work(cfg, tokenizer, trace: dict) -> dict[str, float]:
    """Tokens and attention pairs the update computes (no padding, no masked pairs).

    Packed update (`rlp.share_prefixes` and packable): each document window once, then each
    row's branch (lead + thought + the given `</think>` when force-closed) attending to its
    prefix and causally to itself. Otherwise each row runs its whole prefix + branch."""
    from megatron_rlp.packing.update import packable
    from megatron_rlp.rollout.template import build_template

    r = cfg.rlp
    prompts, thoughts, windows = trace["prompts"], trace["thoughts"], trace["windows"]
    lead = len(build_template(r.thought_template, tokenizer).lead)
    branch = (thoughts.lengths + lead + (~thoughts.closed).long()).double().cpu()
    prefix = prompts.lengths.repeat_interleave(r.group_size).double().cpu()
    rows = len(thoughts.tokens)
    packed = r.share_prefixes and packable(cfg.model.hybrid_layer_pattern,
                                           r.positions_per_document * r.group_size, rows,
                                           cfg.train.micro_batch_size)
    if packed:
        w = windows.valid.sum(1).double().cpu()
        tokens = float(w.sum() + branch.sum())
        pairs = float((w * (w + 1) / 2).sum() + (branch * prefix + branch * (branch + 1) / 2)
                      .sum())
    else:
        seq = prefix + branch
        tokens, pairs = float(seq.sum()), float((seq * (seq + 1) / 2).sum())
    return {"packed": bool(packed), "tokens": tokens, "attention_pairs": pairs,
            "thought_tokens": float(thoughts.lengths.sum()), "rows": float(rows),
            "mean_prefix_tokens": float(prefix.mean())}


def measure(args) -> dict:
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.timers import PhaseTimer

    cfg, state, sampler = _start(args.config, args.overrides)
    cuda = cfg.device.type == "cuda"
    for _ in range(args.warmup):
        rlp_step(state, sampler, PhaseTimer())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer, trace = PhaseTimer(), {}
    start = time.perf_counter()
    metrics = rlp_step(state, sampler, timer, trace=trace)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"config": args.config, "overrides": args.overrides, "run": what_ran(cfg),
            "metrics": metrics, "step_s": seconds, "phases_s": timer.pop(),
            "work": computed_update_work(cfg, state.tokenizer, trace), "peak_memory_gib": peak,
            "memory_kind": "cuda max_memory_allocated" if cuda else "cpu peak RSS"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("record", "measure"))
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--steps", type=int, default=1, help="record: RLP steps")
    p.add_argument("--warmup", type=int, default=1, help="measure: untimed steps")
    p.add_argument("--write-reference", action="store_true",
                   help="record: mark the JSON as the shipped CPU fp32 reference")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    result = record(args) if args.mode == "record" else measure(args)
    if args.write_reference:
        result["reference"] = {"made_with": f"torch {torch.__version__} on CPU, fp32",
                               "how": "python tools/gpu_check.py --write-references"}
    # One line per top-level key: small files, readable diffs of the shipped references.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items()]
    Path(args.out).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
