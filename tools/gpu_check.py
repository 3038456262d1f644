"""GPU check: the real path on one CUDA GPU, measured against the hardware, as one JSON file.

    bash tools/gpu_check.sh                                   # a bare H200 (see that script)
    python tools/gpu_check.py --out runs/gpu_check            # where megatron-core imports
    python tools/gpu_check.py --device cpu --dry-run --dtype fp32 --out /tmp/gc   # tests

Stages (each a subprocess running the project's own entry points, so a CUDA run and a CPU
run never share a process: the CPU backend patches torch process-wide):

1. `tiny`: the tiny dense and tiny hybrid configs train `--tiny-steps` RLP steps with
   `pretrain_rlp.py` on `--device` in `--dtype` (bf16 on the GPU).
2. `reference`: the same configs, one step, on CPU in fp32. Step-1 `s_ema`, `s_pred` and
   `reward_mean` must agree within `--tolerance` nats (bf16 keeps 8 significant bits: its
   per-layer rounding moves a log-prob by ~1e-2 at these sizes; thoughts are keyed by
   (seed, step, context, thought, token), so both runs draw the same uniforms).
3. `qwen3_shape`: `tools/bench_rlp_step.py` on a randomly initialised Qwen3-1.7B-shaped model
   (examples/configs/qwen3_1p7b.yaml, its 151936-row padded vocabulary; tokenizer: the
   512-token test BPE, so thoughts are rarely closed early) at `--contexts` x `--group` x
   `--thought-tokens`; one untimed and one timed step.
4. `te`, only where Transformer Engine imports (NGC images): the tiny configs on the TE spec
   in bf16 and the dense one in FP8 (hybrid, tensorwise), 2 steps each; skipped elsewhere.
5. `packed_attention`: tools/bench_packed_attention.py on the tiny dense config in `--dtype`:
   one packed update (4 documents x 8 positions x G=8, 1024-token windows, 64-token thoughts,
   5120-token packed sequences, 87% of 128x128 tiles masked) with the explicit tree mask and
   with FlexAttention (compiled, block-sparse): block sparsity, seconds of each, loss and
   gradient differences. Last, so it cannot take an earlier stage's budget.
6. The JSON (`OUT/gpu_check.json`): per stage the metrics and wall time, plus
   - decode tokens/s (decoded thought tokens / rollout-phase seconds, prefill included)
     against the roofline of a full-batch decode step: max(bytes read / HBM bandwidth,
     FLOPs / peak), bytes = bf16 weights (output layer included) + each row's K/V
     (attention layers; a hybrid model's Mamba states are not counted);
   - update tokens/s (prefix + thought tokens / update-phase seconds) and MFU: model FLOPs
     (6 x matmul parameters x tokens, attention scores, the output layer at thought positions
     only, as the update computes it) / seconds / peak;
   - peak memory (torch.cuda.max_memory_allocated; CPU: peak RSS).
   Peaks: `--hbm-tbps` (H200 4.8 TB/s) and `--peak-tflops` (bf16 dense ~790 TFLOP/s measured
   on H200; the data sheet says 989). On CPU they are the H200's, so the fractions there
   mean nothing: the dry run checks the plumbing, not the machine.

`--dry-run` shrinks every stage (tiny steps, a 2-layer Qwen3-shaped model) so the whole path
runs on CPU in a test. The full run is budgeted for < 8 minutes on an H200 (`--budget-s`):
each stage gets a timeout from what is left, and `within_budget` in the JSON says whether it held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"dense": "examples/configs/tiny_cpu.yaml",
        "hybrid": "examples/configs/tiny_hybrid_cpu.yaml"}
QWEN3 = "examples/configs/qwen3_1p7b.yaml"
BPE = "tests/assets/tiny_bpe/tokenizer.json"
COMPARED = ("s_ema", "s_pred", "reward_mean")
# Dry run: a few contexts, short thoughts, a 2-layer model with Qwen3's layer shape ratios.
DRY_TINY = ("rlp.contexts_per_step=2", "rlp.group_size=2", "rlp.max_thought_tokens=4")
DRY_QWEN3 = ("model.hybrid_layer_pattern=*-", "model.hidden_size=64", "model.ffn_hidden_size=192",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16",
             "model.make_vocab_size_divisible_by=1024", "model.max_sequence_length=256")


class Budget:
    """Wall-clock budget over all stages; each subprocess gets what is left."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def run_child(args: list[str], budget: Budget, log: Path) -> tuple[int, float]:
    """Run `python ARGS` from the repository root; stdout+stderr to `log`. Returns
    (exit code, seconds); 124 when it ran past the budget."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.monotonic()
    with open(log, "w") as out:
        try:
            rc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, timeout=max(budget.left(), 1)
                                ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - start


def step_metrics(path: Path, step: int = 1) -> dict | None:
    """The metrics of `step` from a `train.metrics_file` JSONL, or None."""
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == step:
            return row
    return None


def compare(device: dict | None, reference: dict | None, tolerance: float) -> dict:
    """Step-1 metrics of the device run vs the CPU fp32 reference: |difference| per key."""
    if device is None or reference is None:
        return {"ok": False, "reason": "a run wrote no step-1 metrics"}
    diff = {k: abs(device[k] - reference[k]) for k in COMPARED}
    return {"ok": all(d <= tolerance for d in diff.values()), "tolerance_nats": tolerance,
            "abs_diff": diff, "device": {k: device[k] for k in COMPARED},
            "reference_cpu_fp32": {k: reference[k] for k in COMPARED}}


def model_shape(cfg, vocab: int) -> dict[str, float]:
    """Parameter counts (matmul weights of the layers, output layer) and per-token K/V size
    of `cfg.model` with the padded vocabulary `vocab`."""
    m = cfg.model
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    pattern = m.hybrid_layer_pattern
    attn = m.hidden_size * kv * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.activation == "swiglu" else 2)
    heads = m.mamba_heads()
    d_inner = heads * m.mamba_head_dim
    mamba = m.hidden_size * (2 * d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim + heads) \
        + d_inner * m.hidden_size
    layers = pattern.count("*") * attn + pattern.count("-") * mlp + pattern.count("M") * mamba
    return {"layer_matmul_params": float(layers), "output_params": float(vocab * m.hidden_size),
            "attention_layers": float(pattern.count("*")),
            "attention_width": float(m.num_attention_heads * kv),
            "kv_bytes_per_token_bf16": float(pattern.count("*") * 2 * m.num_query_groups * kv * 2)}


def roofline(shape: dict, rows: int, prefix: float, thought: float, decode_s: float,
             update_s: float, update_tokens: float, hbm_tbps: float, peak_tflops: float
             ) -> dict[str, float]:
    """Decode vs its roofline and update MFU (see module doc). `prefix`/`thought`: mean
    tokens per row; `decode_s`/`update_s`: phase seconds; `update_tokens`: tokens trained."""
    peak, bw = peak_tflops * 1e12, hbm_tbps * 1e12
    weights = 2 * (shape["layer_matmul_params"] + shape["output_params"])  # bf16 bytes
    context = prefix + 1 + thought / 2  # mean tokens a row's decode step attends to
    step_bytes = weights + rows * context * shape["kv_bytes_per_token_bf16"]
    step_flops = 2 * rows * (shape["layer_matmul_params"] + shape["output_params"]
                             + 2 * shape["attention_layers"] * shape["attention_width"] * context)
    step_s = max(step_bytes / bw, step_flops / peak)
    decoded = rows * thought
    seq = prefix + 1 + thought
    forward = (2 * shape["layer_matmul_params"] * update_tokens
               + 2 * shape["output_params"] * decoded  # logits at thought positions only
               # QK^T and PV, causal: 2 x 2 x width x S^2 / 2 per attention layer and row
               + 2 * shape["attention_layers"] * shape["attention_width"] * seq * seq * rows)
    return {
        "decode_tokens_per_s": decoded / decode_s,
        "decode_roofline_tokens_per_s": rows / step_s,
        "decode_fraction_of_roofline": (decoded / decode_s) / (rows / step_s),
        "decode_bound": "hbm" if step_bytes / bw >= step_flops / peak else "compute",
        "update_tokens_per_s": update_tokens / update_s,
        "update_model_tflops": 3 * forward / update_s / 1e12,
        "update_mfu": 3 * forward / update_s / peak,
    }


def qwen3_stage(args, out: Path, budget: Budget) -> dict:
    """One RLP step of the Qwen3-1.7B-shaped model (bench_rlp_step.py), plus the roofline."""
    from megatron_rlp.startup import load_config
    from megatron_rlp.tokenizer import build_tokenizer

    overrides = [f"device.type={args.device}", f"precision.params_dtype={args.dtype}",
                 f"data.tokenizer={BPE}", f"rlp.contexts_per_step={args.contexts}",
                 f"rlp.group_size={args.group}", f"rlp.max_thought_tokens={args.thought_tokens}",
                 f"rlp.min_prefix_tokens={args.prefix_tokens // 2}",
                 f"rlp.max_prefix_tokens={args.prefix_tokens}", "rlp.positions_per_document=4",
                 f"train.micro_batch_size={args.micro_batch}", f"train.seed={args.seed}"]
    if args.dry_run:
        overrides += DRY_QWEN3
    cfg = load_config(QWEN3, tuple(overrides))
    result_file = out / "qwen3_shape_bench.json"
    rc, seconds = run_child(["tools/bench_rlp_step.py", "--config", QWEN3, "--steps", "1",
                             "--warmup", "1", "--out", str(result_file), *overrides],
                            budget, out / "qwen3_shape.log")
    stage = {"rc": rc, "seconds": seconds, "overrides": overrides, "ok": False}
    if rc != 0 or not result_file.is_file():
        return stage
    bench = json.loads(result_file.read_text())
    phases, tput = bench["phases_s"], bench["throughput"]
    rows = cfg.rlp.contexts_per_step * cfg.rlp.group_size
    rollout_s = phases["rollout"]["mean"]
    decoded = tput["rollout_decoded_tokens_per_s"] * rollout_s
    tokens = tput["tokens_per_s"] * phases["step"]["mean"]  # steps=1: the step's tokens
    thought = decoded / rows
    prefix = tokens / rows - 1 - thought
    multiple = cfg.model.make_vocab_size_divisible_by  # provider.padded_vocab_size
    vocab = -(-build_tokenizer(BPE).vocab_size // multiple) * multiple
    shape = model_shape(cfg, vocab)
    stage.update(
        ok=True, rows=rows, mean_prefix_tokens=prefix, mean_thought_tokens=thought,
        phases_s={k: v["mean"] for k, v in phases.items()}, peak_memory_gib=bench["memory"][
            "peak_gib"], memory_kind=bench["memory"]["kind"], model=shape,
        **roofline(shape, rows, prefix, thought, rollout_s, phases["update"]["mean"], tokens,
                   args.hbm_tbps, args.peak_tflops))
    return stage


def tiny_stage(args, name: str, config: str, out: Path, budget: Budget) -> dict:
    """Stages 1-2 for one tiny config: the device run, the CPU fp32 reference, the comparison."""
    extra = list(DRY_TINY) if args.dry_run else []
    runs = {}
    for label, device, dtype, steps in (("device", args.device, args.dtype, args.tiny_steps),
                                        ("reference", "cpu", "fp32", 1)):
        metrics = out / f"tiny_{name}_{label}.jsonl"
        metrics.unlink(missing_ok=True)
        rc, seconds = run_child(
            ["pretrain_rlp.py", "--config", config, f"device.type={device}",
             f"precision.params_dtype={dtype}", f"train.steps={steps}",
             f"train.metrics_file={metrics}", f"train.seed={args.seed}", "train.progress=false",
             *extra], budget, out / f"tiny_{name}_{label}.log")
        last = step_metrics(metrics, steps)
        runs[label] = {"rc": rc, "seconds": seconds, "device": device, "dtype": dtype,
                       "steps": steps, "step1": step_metrics(metrics, 1),
                       "last_reward_mean": None if last is None else last["reward_mean"]}
    check = compare(runs["device"]["step1"], runs["reference"]["step1"], args.tolerance)
    return {**runs, "step1_vs_cpu_fp32": check,
            "ok": all(r["rc"] == 0 for r in runs.values()) and check["ok"]}


def packed_attention_stage(args, out: Path, budget: Budget) -> dict:
    """Flex vs explicit-mask core attention of one packed update (bench_packed_attention.py)."""
    shape = ["--docs", "4", "--positions", "8", "--group", "8", "--window", "1024",
             "--thought", "64", "--repeats", "3"]
    if args.dry_run:
        shape = ["--docs", "1", "--positions", "2", "--group", "2", "--window", "32",
                 "--thought", "4", "--repeats", "1", "--block-size", "16"]
    result_file = out / "packed_attention.json"
    result_file.unlink(missing_ok=True)
    rc, seconds = run_child(["tools/bench_packed_attention.py", "--config", TINY["dense"],
                             *shape, "--out", str(result_file), f"device.type={args.device}",
                             f"precision.params_dtype={args.dtype}", f"train.seed={args.seed}"],
                            budget, out / "packed_attention.log")
    stage = {"rc": rc, "seconds": seconds, "ok": False}
    if rc == 0 and result_file.is_file():
        bench = json.loads(result_file.read_text())
        stage.update(ok=True, **{k: bench[k] for k in ("sparsity", "seconds",
                                                       "speedup_flex_vs_mask", "loss_abs_diff",
                                                       "grad_max_abs_diff")})
    return stage


def te_stage(args, out: Path, budget: Budget) -> dict:
    """Where Transformer Engine imports (NGC images; never on the bare H200): the tiny configs
    with `model.transformer_impl=transformer_engine` in bf16, and the dense one in FP8
    (hybrid format, tensorwise recipe, first/last layer bf16). Each must train 2 steps with
    finite rewards. Not compared with the CPU runs: TE modules draw their own initial weights."""
    rc, _ = run_child(["-c", "import transformer_engine.pytorch"], budget, out / "te_probe.log")
    if args.device != "cuda" or rc != 0:
        return {"ok": True, "skipped": "Transformer Engine does not import here"
                if rc != 0 else "not on CUDA"}
    fp8 = ("precision.fp8=hybrid", "precision.fp8_recipe=tensorwise",
           "precision.first_last_layers_bf16=true")
    runs = {"te_dense_bf16": (TINY["dense"], ()), "te_hybrid_bf16": (TINY["hybrid"], ()),
            "te_dense_fp8": (TINY["dense"], fp8)}
    stage: dict = {}
    for name, (config, extra) in runs.items():
        metrics = out / f"{name}.jsonl"
        metrics.unlink(missing_ok=True)
        rc, seconds = run_child(
            ["pretrain_rlp.py", "--config", config, "device.type=cuda",
             "precision.params_dtype=bf16", "model.transformer_impl=transformer_engine",
             "train.steps=2", f"train.metrics_file={metrics}", f"train.seed={args.seed}",
             "train.progress=false", *extra], budget, out / f"{name}.log")
        rows = [step_metrics(metrics, k) for k in (1, 2)]
        finite = all(r is not None and abs(r["reward_mean"]) < float("inf") for r in rows)
        stage[name] = {"rc": rc, "seconds": seconds, "overrides": list(extra),
                       "reward_mean": [r and r["reward_mean"] for r in rows],
                       "ok": rc == 0 and finite}
    stage["ok"] = all(v["ok"] for v in stage.values())
    return stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes everywhere (CPU tests)")
    p.add_argument("--tiny-steps", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.1, help="nats, step-1 metrics")
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--thought-tokens", type=int, default=512)
    p.add_argument("--prefix-tokens", type=int, default=512, help="max prefix (min: half)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--hbm-tbps", type=float, default=4.8)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--skip", nargs="*", default=[],
                   choices=("tiny", "qwen3_shape", "packed_attention", "te"))
    p.add_argument("--tiny-configs", nargs="*", default=list(TINY), choices=list(TINY))
    args = p.parse_args(argv)
    if args.dry_run:
        args.contexts, args.group, args.thought_tokens, args.prefix_tokens = 4, 2, 8, 32
        args.micro_batch, args.tiny_steps = 0, min(args.tiny_steps, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    report: dict = {"args": vars(args), "stages": {}}
    try:
        import torch

        report["machine"] = {
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": list(torch.cuda.get_device_capability())
            if torch.cuda.is_available() else None}
    except ImportError:
        report["machine"] = {"torch": None}
    if "tiny" not in args.skip:
        for name in args.tiny_configs:
            config = TINY[name]
            report["stages"][f"tiny_{name}"] = tiny_stage(args, name, config, out, budget)
    if "qwen3_shape" not in args.skip:
        report["stages"]["qwen3_shape"] = qwen3_stage(args, out, budget)
    if "te" not in args.skip:
        report["stages"]["te"] = te_stage(args, out, budget)
    if "packed_attention" not in args.skip:  # last: it cannot eat an earlier stage's budget
        report["stages"]["packed_attention"] = packed_attention_stage(args, out, budget)
    report["elapsed_s"] = budget.elapsed()
    report["within_budget"] = budget.elapsed() <= args.budget_s
    report["ok"] = report["within_budget"] and all(s["ok"] for s in report["stages"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, stage in report["stages"].items():
        state = stage.get("skipped") and f"skipped ({stage['skipped']})"
        print(f"[gpu_check] {name}: {state or ('ok' if stage['ok'] else 'FAILED')}", flush=True)
    q = report["stages"].get("qwen3_shape", {})
    if q.get("ok"):
        print(f"[gpu_check] decode {q['decode_tokens_per_s']:.0f} tok/s "
              f"({100 * q['decode_fraction_of_roofline']:.1f}% of roofline) | update "
              f"{q['update_tokens_per_s']:.0f} tok/s, MFU {100 * q['update_mfu']:.1f}% | peak "
              f"{q['peak_memory_gib']:.1f} GiB", flush=True)
    pa = report["stages"].get("packed_attention", {})
    if pa.get("ok"):
        print(f"[gpu_check] packed update: block sparsity {pa['sparsity']['block']:.3f} | "
              f"flex {pa['seconds']['flex']:.4f}s vs mask {pa['seconds']['mask']:.4f}s "
              f"({pa['speedup_flex_vs_mask']:.2f}x)", flush=True)
    print(f"[gpu_check] {out / 'gpu_check.json'} ({report['elapsed_s']:.0f} s)", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
