"""RLP vs compute-matched next-token pretraining, from one annealed NTP base, over seeds.

    python tools/compare_rlp_ntp.py --out-dir runs/compare            # the default run
    python tools/compare_rlp_ntp.py --quick --out-dir /tmp/cmp        # seconds: a smoke run
    python tools/compare_rlp_ntp.py --table runs/compare/compare.json # the README's tables

What it does, in one process (world size 1, CPU/gloo or one GPU):
 1. two task corpora (megatron_rlp/eval/tasks.py, via tools/make_tasks.py; `--kinds`,
    `--digits`): the *warm-up* corpus, where a share of the items (`--think-rate`) carry
    worked thoughts, so the base learns the thought format; and a separate *continuation*
    corpus (other documents, drawn with another seed) that both arms read, with no worked
    thoughts by default (`--continue-think-rate 0`), as both arms of the paper read general
    pretraining text; the held-out split (`--eval-items`) shares no instance with either;
 2. the *base*: an NTP warm-up (`--warmup-steps` at `--warmup-lr`) then `--anneal-steps` of
    cosine decay down to the arms' `--lr`, so the gain of the lr drop is in the base before
    either arm starts (the paper's bases were annealed); cached in `--cache-dir` by its
    settings and reused;
 3. for each of `--seeds` seeds (train.seed = --seed + i): every RLP arm (`--reward-tokens`:
    one arm per horizon k of the information-gain reward, `rlp.reward_tokens`) and the NTP
    arm, each loaded from the one base (policy weights only, fresh optimizer, step 0; the
    JSON records a fingerprint of each arm's starting weights). RLP contexts are the
    continuation corpus's answer starts (`--positions answer`). NTP runs until it has seen
    the largest RLP arm's compute in tokens (and, with `--wall-match`, on to its wall time);
 4. held-out evaluation (eval/benchmark.py) of the base and of every arm at `--eval-points`
    points, three ways: greedy answer without a thought (raw), the *fair* no-thought
    baseline (`<think>` banned at the answer start, the first token's log-likelihood
    renormalised without it: a base whose corpus opens answers with thoughts otherwise
    starts a thought and reads 0), and a greedy answer after each of `--think-samples`
    sampled thoughts; accuracy (with its item standard error), the gold answer's
    log-likelihood and that of its first token;
 5. `compare.json` (every number, per seed; means with 95% intervals over seeds, and paired
    per-seed differences of the arms: eval/intervals.py) and `compare.png`.

Compute matching, the paper's rule (RLP, arXiv 2510.01265; RLP.md): NTP tokens = rollouts x
thought length x contexts x steps + input tokens. Counted here as
    rlp_tokens = G * L_think * B * steps  +  sum over steps and contexts of (prefix + k)
with L_think the configured `rlp.max_thought_tokens` (the budget, as the paper counts it),
the prefix the context tokens the rollout conditions on, k the scored tokens.
NTP steps = ceil(rlp_tokens / (data.ntp_batch_size * data.ntp_seq_length)).

Wall times are training only; on a shared machine they are noisy. Why a tool of its own and
not `pretrain_rlp.py` runs: the base, the arms and their evaluations share one process and
weights in memory (no checkpoint round-trip per point); the steps are the project's
`rlp_step` and `ntp_step`, unchanged. Plot and tables: tools/compare_report.py.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
FULL = dict(num_docs=1000, continue_docs=1000, warmup_steps=400, anneal_steps=200,
            warmup_lr=1e-3, rlp_steps=60, eval_points=1, eval_items=625, think_samples=2,
            contexts=8, group_size=8, seeds=3)
QUICK = dict(num_docs=60, continue_docs=40, warmup_steps=4, anneal_steps=2, warmup_lr=1e-3,
             rlp_steps=2, eval_points=1, eval_items=3, think_samples=1, contexts=2,
             group_size=2, seeds=2)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--out-dir", type=Path, default=ROOT / "runs" / "compare")
    a("--cache-dir", type=Path, help="bases and tasks (default: OUT_DIR/cache)")
    a("--quick", action="store_true", help="a seconds-long smoke run (tests)")
    a("--table", type=Path, metavar="JSON", help="only print the tables of a compare.json")
    a("--base-only", action="store_true", help="build (or reuse) the base, then stop")
    a("--kinds", default="add", help="task kinds (comma-separated; eval/tasks.py KINDS)")
    a("--digits", type=int, default=2, help="operand digits of `add`")
    a("--num-docs", type=int, help="documents of the warm-up corpus")
    a("--continue-docs", type=int, help="documents of the continuation corpus")
    a("--think-rate", type=float, default=0.5,
      help="share of warm-up items written with their working as a thought")
    a("--continue-think-rate", type=float, default=0.0,
      help="the same for the continuation corpus both arms read (default: none)")
    a("--warmup-steps", type=int)
    a("--anneal-steps", type=int, help="cosine decay from --warmup-lr to --lr (>= 0)")
    a("--warmup-lr", type=float)
    a("--rlp-steps", type=int)
    a("--lr", type=float, default=3e-5, help="lr of both arms (constant)")
    a("--ntp-lr", type=float, help="lr of the NTP arm (default: --lr)")
    a("--contexts", type=int, help="RLP contexts per step (B)")
    a("--group-size", type=int, help="thoughts per context (G)")
    a("--reward-tokens", default="1", help="comma-separated reward horizons k, an RLP arm "
      "each (rlp.reward_tokens; k=3 covers a 2-digit sum and its end)")
    a("--reward-discount", type=float, default=1.0, help="rlp.reward_discount of k > 1 arms")
    a("--thought-tokens", type=int, default=0,
      help="L_think; 0 = the 90th percentile of the worked thoughts")
    a("--positions", choices=("answer", "uniform", "entropy"), default="answer")
    a("--eval-points", type=int, help="evaluations along each arm (>= 1)")
    a("--eval-items", type=int, help="held-out items (625: accuracy SE <= 0.02)")
    a("--think-samples", type=int, help="thoughts per held-out item")
    a("--wall-match", action="store_true", help="also evaluate NTP at the RLP wall time")
    a("--seeds", type=int, help="seeds; both arms run per seed from the one base")
    a("--seed-indices", help="run only these seed indices (comma-separated, instead of "
      "0..--seeds-1), e.g. one per process; --merge joins the reports")
    a("--merge", type=Path, nargs="+", metavar="JSON",
      help="join compare.json files of one base (other seeds) into OUT_DIR's report")
    a("--seed", type=int, default=1234)
    a("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    a("overrides", nargs="*", help="section.key=value for every phase's config")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ntp_lr = args.lr if args.ntp_lr is None else args.ntp_lr
    args.cache_dir = args.cache_dir or args.out_dir / "cache"
    return args


def check_args(args: argparse.Namespace) -> str | None:
    """One line naming the first bad option, or None."""
    try:
        horizons = [int(k) for k in args.reward_tokens.split(",")]
    except ValueError:
        horizons = []
    args.horizons = horizons
    try:
        indices = ([int(i) for i in args.seed_indices.split(",")] if args.seed_indices
                   else list(range(args.seeds)))
    except ValueError:
        indices = []
    args.indices = indices
    for flag, ok, allowed in (
        ("--warmup-steps", args.warmup_steps >= 1, "an integer >= 1"),
        ("--anneal-steps", args.anneal_steps >= 0, "an integer >= 0"),
        ("--rlp-steps", args.rlp_steps >= 1, "an integer >= 1"),
        ("--eval-points", 1 <= args.eval_points <= args.rlp_steps, "1 <= N <= --rlp-steps"),
        ("--eval-items", args.eval_items >= 1, "an integer >= 1"),
        ("--think-samples", args.think_samples >= 1, "an integer >= 1"),
        ("--seeds", args.seeds >= 1, "an integer >= 1"),
        ("--seed-indices", bool(indices) and min(indices) >= 0
         and len(set(indices)) == len(indices), "distinct integers >= 0, comma-separated"),
        ("--digits", args.digits >= 1, "an integer >= 1"),
        ("--think-rate", 0 <= args.think_rate <= 1, "a fraction in [0, 1]"),
        ("--continue-think-rate", 0 <= args.continue_think_rate <= 1, "a fraction in [0, 1]"),
        ("--thought-tokens", args.thought_tokens >= 0, "an integer >= 0 (0 = the p90)"),
        ("--lr", args.lr > 0 and args.ntp_lr > 0, "a positive float"),
        ("--reward-tokens", bool(horizons) and min(horizons) >= 1
         and len(set(horizons)) == len(horizons), "distinct integers >= 1, comma-separated"),
    ):
        if not ok:
            return f"{flag}={getattr(args, flag[2:].replace('-', '_'))} (allowed: {allowed})"
    return None


def make_task(args, name: str, docs: int, think_rate: float, seed: int) -> Path:
    """Task files (cached by their settings): train.jsonl and heldout.jsonl."""
    key = f"{name}_{args.kinds.replace(',', '-')}_d{args.digits}_docs{docs}_think{think_rate}" \
          f"_seed{seed}_held{args.eval_items}"
    out = args.cache_dir / f"tasks_{key}"
    if not (out / "heldout.jsonl").is_file():
        kinds = [k for k in args.kinds.split(",") if k]
        code = _load_tool("make_tasks").main([
            "--out-dir", str(out), "--num-docs", str(docs), "--think-rate", str(think_rate),
            "--seed", str(seed), "--kinds", args.kinds, "--digits", str(args.digits),
            "--num-heldout", str(-(-args.eval_items // len(kinds)))])
        if code:
            raise SystemExit(code)
    return out


def thought_p90(tasks: Path) -> int:
    """The 90th percentile of the worked thoughts' token lengths (byte tokenizer:
    characters, plus `</think>`)."""
    works = sorted(len(json.loads(line)["work"]) + 1
                   for line in (tasks / "heldout.jsonl").read_text().splitlines())
    return works[min(len(works) - 1, int(0.9 * len(works)))]


def phase_config(args, corpus: Path, objective: str, lr: float, steps: int, thought: int,
                 seed: int, extra: tuple[str, ...] = ()):
    from megatron_rlp.startup import load_config

    strategy = "uniform" if args.positions == "answer" else args.positions
    overrides = [
        f"data.corpus={corpus / 'train.jsonl'}", f"train.objective={objective}",
        f"train.steps={steps}", f"train.seed={seed}", f"optimizer.lr={lr}",
        f"rlp.contexts_per_step={args.contexts}", f"rlp.group_size={args.group_size}",
        f"rlp.max_thought_tokens={thought}", f"rlp.position_strategy={strategy}",
        "rlp.min_prefix_tokens=16", f"device.num_threads={args.threads}",
        *(("model.hidden_size=64", "model.ffn_hidden_size=128", "model.hybrid_layer_pattern=*-",
           "data.ntp_batch_size=4") if args.quick else ()),
        *extra, *args.overrides]
    return load_config(str(BASE_CONFIG), tuple(overrides), world_size=1)


def anneal_lr(step: int, warmup: int, anneal: int, peak: float, final: float) -> float:
    """lr of base step `step` (1-based): `peak` for the warm-up, then a cosine from `peak` to
    `final` over the annealing steps (the last step runs at `final`)."""
    if step <= warmup:
        return peak
    frac = (step - warmup) / anneal
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * frac))


def build_base(args, cfg) -> tuple[Path, dict]:
    """The annealed NTP base checkpoint (trained now, or reused from the cache) and its
    record. The lr of each step is set on the optimizer's groups (`anneal_lr`); Megatron's
    scheduler runs constant at the peak and is overridden before every step."""
    from megatron_rlp.checkpoint import latest_checkpoint, save_checkpoint
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.ntp_step import ntp_step
    from megatron_rlp.train.samplers import make_ntp_batcher
    from megatron_rlp.train.timers import PhaseTimer

    what = {k: v for k, v in cfg.to_dict().items() if k not in ("rlp", "device")}
    what["anneal"] = [args.warmup_steps, args.anneal_steps, args.warmup_lr, args.lr]
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    root = args.cache_dir / f"base_{key.hexdigest()[:12]}"
    record_file = root / "base.json"
    if latest_checkpoint(root) is not None and record_file.is_file():
        record = json.loads(record_file.read_text())
        record["reused"] = True
        print(f"[compare] base reused from {root}", flush=True)
        return latest_checkpoint(root), record
    state = build_state(cfg)
    batcher, timer, losses, lrs = make_ntp_batcher(state), PhaseTimer(), [], []
    start, cpu = time.perf_counter(), time.process_time()
    while state.step < cfg.train.steps:
        lr = anneal_lr(state.step + 1, args.warmup_steps, args.anneal_steps, args.warmup_lr,
                       args.lr)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        losses.append(ntp_step(state, batcher, timer)["loss"])
        lrs.append(lr)
        timer.pop()
        if state.step % 50 == 0 or state.step == cfg.train.steps:
            print(f"[base step {state.step:5d}] loss {losses[-1]:.4f} lr {lr:.2e} | "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    record = {"steps": state.step, "warmup_steps": args.warmup_steps,
              "anneal_steps": args.anneal_steps, "lr": lrs, "wall_s": time.perf_counter() - start,
              "cpu_s": time.process_time() - cpu, "tokens": state.consumed_tokens,
              "loss": losses, "reused": False}
    path = save_checkpoint(state, str(root), keep_last=1)
    record_file.write_text(json.dumps(record) + "\n")
    return path, record


def run_seed(args, seed: int, ctx: dict) -> dict:
    """Every RLP arm and the NTP arm of one seed, from the base."""
    arms = _load_tool("compare_arms")
    n = args.eval_points
    eval_steps = sorted({math.ceil(args.rlp_steps * (i + 1) / n) for i in range(n)})
    out = {"seed": seed, "rlp": {}}
    for k in args.horizons:
        extra = () if k == 1 else (f"rlp.reward_tokens={k}",
                                   f"rlp.reward_discount={args.reward_discount}")
        cfg = phase_config(args, ctx["cont"], "rlp", args.lr, args.rlp_steps, ctx["thought"],
                           seed, extra)
        out["rlp"][f"k{k}"] = arms.run_rlp(args, cfg, ctx["checkpoint"], ctx["records"],
                                      set(eval_steps), f"rlp k={k} seed {seed}")
    ncfg = phase_config(args, ctx["cont"], "ntp", args.ntp_lr, 100 * args.rlp_steps,
                        ctx["thought"], seed)
    per_step = ncfg.data.ntp_batch_size * ncfg.data.ntp_seq_length
    matched = sorted({max(1, math.ceil(max(a["points"][i]["compute_tokens"]
                                           for a in out["rlp"].values()) / per_step))
                      for i in range(len(eval_steps))})
    rlp_wall = max(a["wall_s"] for a in out["rlp"].values())
    out["ntp"] = arms.run_ntp(args, ncfg, ctx["checkpoint"], ctx["records"], matched, rlp_wall)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report_tool = _load_tool("compare_report")
    if args.table is not None:
        try:
            table = report_tool.markdown_tables(json.loads(args.table.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --table={args.table} is not a compare.json written by this tool "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        print(table)
        return 0
    if args.merge:
        if (bad := report_tool.merge(args.merge, args.out_dir)) is not None:
            print(f"error: {bad}", file=sys.stderr)
            return 2
        return 0
    if (bad := check_args(args)) is not None:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    from megatron_rlp.startup import quiet_megatron

    quiet_megatron()
    from megatron_rlp.config import ConfigError
    from megatron_rlp.eval.benchmark import read_benchmark

    t_start, c_start = time.perf_counter(), time.process_time()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    warm = make_task(args, "warmup", args.num_docs, args.think_rate, args.seed)
    cont = make_task(args, "continue", args.continue_docs, args.continue_think_rate,
                     args.seed + 7919)
    thought = args.thought_tokens or thought_p90(warm)
    records = read_benchmark(warm / "heldout.jsonl")[:args.eval_items]
    try:
        bcfg = phase_config(args, warm, "ntp", args.warmup_lr,
                            args.warmup_steps + args.anneal_steps, thought, args.seed)
        for k in args.horizons:  # every arm's config, checked before anything runs
            phase_config(args, cont, "rlp", args.lr, args.rlp_steps, thought, args.seed,
                         () if k == 1 else (f"rlp.reward_tokens={k}",
                                            f"rlp.reward_discount={args.reward_discount}"))
    except ConfigError as e:
        print(f"error: {str(e).removeprefix('error: ')}", file=sys.stderr)
        return 2
    from megatron_rlp import distributed

    arms = _load_tool("compare_arms")
    distributed.initialize(bcfg)
    try:
        checkpoint, base = build_base(args, bcfg)
        if args.base_only:
            print(f"[compare] base at {checkpoint}", flush=True)
            return 0
        state = arms.start_arm(bcfg, checkpoint)
        # The base's evaluation is cached beside it (per evaluation settings): processes
        # that run other seeds of the same base reuse it.
        cached = checkpoint.parent / f"eval_{len(records)}_{args.think_samples}_{args.seed}.json"
        base_eval = (json.loads(cached.read_text()) if cached.is_file() else
                     arms.evaluate(state, records, args.think_samples, args.seed))
        cached.write_text(json.dumps(base_eval) + "\n")
        base.update(checkpoint=str(checkpoint), fingerprint=arms.fingerprint(state.policy),
                    eval=base_eval)
        print(arms.summary_line("base", {"step": 0, "compute_tokens": 0, "eval": base["eval"]}),
              flush=True)
        del state
        ctx = dict(cont=cont, thought=thought, checkpoint=checkpoint, records=records)
        seeds = [run_seed(args, args.seed + i, ctx) for i in args.indices]
    finally:
        distributed.shutdown()
    starts = {base["fingerprint"]} | {a["start_fingerprint"] for s in seeds
                                      for a in [*s["rlp"].values(), s["ntp"]]}
    report = {
        "command": " ".join(["tools/compare_rlp_ntp.py", *argv]), "quick": args.quick,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tasks": {"warmup": str(warm), "continue": str(cont)},
        "heldout_items": len(records), "thought_tokens": thought,
        "compute_rule": "rlp_tokens = G * L_think * B * steps + sum over contexts of "
                        "(prefix + k); ntp_tokens = steps * ntp_batch_size * ntp_seq_length",
        "config": {"base": bcfg.to_dict()}, "base": base, "seeds": seeds,
        "same_base": len(starts) == 1,
        "total_wall_s": time.perf_counter() - t_start,
        "total_cpu_s": time.process_time() - c_start,
    }
    report_tool.write_report(report, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
