"""RLP vs compute-matched next-token pretraining, from one NTP warm-up of a tiny model.

    python tools/compare_rlp_ntp.py --out-dir runs/compare            # the full run
    python tools/compare_rlp_ntp.py --quick --out-dir /tmp/cmp        # seconds: a smoke run
    python tools/compare_rlp_ntp.py --table runs/compare/compare.json # the README's table

What it does, in one process (world size 1, CPU/gloo or one GPU):
 1. the task (megatron_rlp/eval/tasks.py, via tools/make_tasks.py): a training corpus where a
    share of the items (`--think-rate`) carry worked thoughts, and a held-out split;
 2. an NTP warm-up of the tiny model on it (`--warmup-steps` at `--warmup-lr`), saved under
    `--cache-dir` and reused by later runs with the same settings;
 3. arm (a), RLP, and arm (b), NTP, both loaded from that one checkpoint (policy weights
    only, fresh optimizer, step 0; the JSON records a fingerprint of each arm's starting
    weights). RLP contexts are the task's answer starts by default (`--positions answer`,
    data/answer_positions.py); NTP runs until it has seen the RLP arm's compute in tokens,
    then (`--wall-match`) on until its training wall time equals the RLP arm's;
 4. held-out evaluation (megatron_rlp/eval/benchmark.py) of the warm-up and of both arms at
    `--eval-points` points: greedy answer without a thought, and `--think-samples` sampled
    thoughts each followed by a greedy answer; accuracy, the gold answer's log-likelihood and
    that of its first token;
 5. `compare.json` (every number, the config, seeds, wall times) and `compare.png`.

Compute matching, the paper's rule (RLP, arXiv 2510.01265; RLP.md): NTP tokens = rollouts x
thought length x contexts x steps + input tokens. Counted here as
    rlp_tokens = G * L_think * B * steps  +  sum over steps and contexts of (prefix + 1)
with L_think the configured `rlp.max_thought_tokens` (the budget, as the paper counts it, not
the sampled length), the prefix the context tokens the rollout conditions on and +1 its target.
NTP steps = ceil(rlp_tokens / (data.ntp_batch_size * data.ntp_seq_length)). Evaluation points
of the NTP arm sit at the same compute fractions as the RLP arm's.

Wall times are training only (steps, no evaluation), measured in this process; on a shared
machine they are noisy, and both arms run one after the other in the same conditions.
Why a tool of its own and not two `pretrain_rlp.py` runs: the arms, their evaluations and the
warm-up share one process and one set of weights in memory, so each evaluation point costs no
checkpoint round-trip and no start-up; the steps themselves are the project's `rlp_step` and
`ntp_step`, unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
FULL = dict(num_docs=2000, warmup_steps=500, warmup_lr=1e-3, rlp_steps=100, eval_points=3,
            eval_items=90, think_samples=4, contexts=8, group_size=8)
QUICK = dict(num_docs=80, warmup_steps=6, warmup_lr=1e-3, rlp_steps=2, eval_points=1,
             eval_items=3, think_samples=1, contexts=2, group_size=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "compare")
    p.add_argument("--cache-dir", type=Path, help="warm-up checkpoints and tasks "
                   "(default: OUT_DIR/cache)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")
    p.add_argument("--table", type=Path, metavar="JSON",
                   help="only print the markdown table of a written compare.json")
    p.add_argument("--num-docs", type=int, help="training documents of the task corpus")
    p.add_argument("--think-rate", type=float, default=0.5,
                   help="share of training items written with their working as a thought")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--warmup-lr", type=float)
    p.add_argument("--rlp-steps", type=int)
    p.add_argument("--lr", type=float, default=3e-5, help="lr of both arms (constant)")
    p.add_argument("--ntp-lr", type=float, help="lr of the NTP arm (default: --lr)")
    p.add_argument("--contexts", type=int, help="RLP contexts per step (B)")
    p.add_argument("--group-size", type=int, help="thoughts per context (G)")
    p.add_argument("--thought-tokens", type=int, default=0,
                   help="L_think; 0 = the 90th percentile of the corpus's worked thoughts")
    p.add_argument("--positions", choices=("answer", "uniform", "entropy"), default="answer",
                   help="RLP positions: the task's answer starts, or rlp.position_strategy")
    p.add_argument("--eval-points", type=int, help="evaluations along each arm (>= 1)")
    p.add_argument("--eval-items", type=int, help="held-out items (kinds interleaved)")
    p.add_argument("--think-samples", type=int, help="thoughts per held-out item")
    p.add_argument("--no-wall-match", dest="wall_match", action="store_false",
                   help="skip the NTP point matched to the RLP arm's wall time")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("overrides", nargs="*", help="section.key=value for both arms' config")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ntp_lr = args.lr if args.ntp_lr is None else args.ntp_lr
    args.cache_dir = args.cache_dir or args.out_dir / "cache"
    return args


def check_args(args: argparse.Namespace) -> str | None:
    """One line naming the first bad option, or None."""
    for flag, ok, allowed in (
        ("--warmup-steps", args.warmup_steps >= 1, "an integer >= 1"),
        ("--rlp-steps", args.rlp_steps >= 1, "an integer >= 1"),
        ("--eval-points", 1 <= args.eval_points <= args.rlp_steps, "1 <= N <= --rlp-steps"),
        ("--eval-items", args.eval_items >= 1, "an integer >= 1"),
        ("--think-samples", args.think_samples >= 1, "an integer >= 1"),
        ("--think-rate", 0 <= args.think_rate <= 1, "a fraction in [0, 1]"),
        ("--thought-tokens", args.thought_tokens >= 0, "an integer >= 0 (0 = the p90)"),
        ("--lr", args.lr > 0 and args.ntp_lr > 0, "a positive float"),
    ):
        if not ok:
            return f"{flag}={getattr(args, flag[2:].replace('-', '_'))} (allowed: {allowed})"
    return None


def make_task(args: argparse.Namespace) -> tuple[Path, int]:
    """The task files (cached by their settings) and the 90th percentile of the worked
    thoughts' token lengths (byte tokenizer: characters, plus `</think>`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tasks", ROOT / "tools" / "make_tasks.py")
    make_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tasks)
    key = f"docs{args.num_docs}_think{args.think_rate}_seed{args.seed}"
    out = args.cache_dir / f"tasks_{key}"
    if not (out / "heldout.jsonl").is_file():
        make_tasks.main(["--out-dir", str(out), "--num-docs", str(args.num_docs),
                         "--think-rate", str(args.think_rate), "--seed", str(args.seed),
                         "--num-heldout", "100"])
    works = [len(json.loads(line)["work"]) + 1
             for line in (out / "heldout.jsonl").read_text().splitlines()]
    works.sort()
    return out, works[min(len(works) - 1, int(0.9 * len(works)))]


def arm_config(args, tasks: Path, objective: str, lr: float, steps: int, thought: int):
    from megatron_rlp.startup import load_config

    strategy = "uniform" if args.positions == "answer" else args.positions
    overrides = [
        f"data.corpus={tasks / 'train.jsonl'}", f"train.objective={objective}",
        f"train.steps={steps}", f"train.seed={args.seed}", f"optimizer.lr={lr}",
        f"rlp.contexts_per_step={args.contexts}", f"rlp.group_size={args.group_size}",
        f"rlp.max_thought_tokens={thought}", f"rlp.position_strategy={strategy}",
        "rlp.min_prefix_tokens=16", f"device.num_threads={args.threads}",
        *(("model.hidden_size=64", "model.ffn_hidden_size=128", "model.hybrid_layer_pattern=*-",
           "data.ntp_batch_size=4") if args.quick else ()),
        *args.overrides]
    return load_config(str(BASE_CONFIG), tuple(overrides), world_size=1)


def fingerprint(model) -> str:
    """SHA-256 (16 hex digits) of every parameter's bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def warmup(args, cfg) -> tuple[Path, dict]:
    """The NTP warm-up checkpoint (trained now, or reused from the cache) and its record."""
    from megatron_rlp.checkpoint import latest_checkpoint, save_checkpoint
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.samplers import make_ntp_batcher
    from megatron_rlp.train.timers import PhaseTimer

    # Keyed by what shapes the warm-up (not the RLP settings the arms use afterwards).
    what = {k: v for k, v in cfg.to_dict().items() if k != "rlp"}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    root = args.cache_dir / f"warmup_{key.hexdigest()[:12]}"
    record_file = root / "warmup.json"
    if latest_checkpoint(root) is not None and record_file.is_file():
        record = json.loads(record_file.read_text())
        record["reused"] = True
        print(f"[compare] warm-up reused from {root}", flush=True)
        return latest_checkpoint(root), record
    state = build_state(cfg)
    batcher, timer, losses = make_ntp_batcher(state), PhaseTimer(), []
    start, cpu = time.perf_counter(), time.process_time()
    from megatron_rlp.train.ntp_step import ntp_step

    while state.step < cfg.train.steps:

        losses.append(ntp_step(state, batcher, timer)["loss"])
        if state.step % 50 == 0 or state.step == cfg.train.steps:
            print(f"[warmup step {state.step:5d}] loss {losses[-1]:.4f} | "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    record = {"steps": state.step, "lr": cfg.optimizer.lr, "wall_s": time.perf_counter() - start,
              "cpu_s": time.process_time() - cpu,
              "tokens": state.consumed_tokens, "loss": losses, "reused": False}
    path = save_checkpoint(state, str(root), keep_last=1)
    record_file.write_text(json.dumps(record) + "\n")
    return path, record


def start_arm(cfg, checkpoint: Path):
    """A fresh TrainState of `cfg` with the warm-up's policy weights (fresh optimizer, step 0)."""
    from megatron_rlp.checkpoint import load_checkpoint
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.resume import ResumeOptions

    state = build_state(cfg)
    load_checkpoint(state, str(checkpoint), True, {}, ResumeOptions(finetune=True))
    return state


def evaluate(state, records: list[dict], think_samples: int, seed: int) -> dict:
    """Held-out metrics of the state's policy: greedy without a thought, and a greedy answer
    after each of `think_samples` sampled thoughts (eval/benchmark.run_benchmark)."""
    from megatron_rlp.eval.benchmark import BenchmarkOptions, run_benchmark
    from megatron_rlp.eval.loading import EvalModel

    em = EvalModel(cfg=state.cfg, tokenizer=state.tokenizer, policy=state.policy,
                   source=f"step {state.step}")
    state.policy.eval()
    start = time.perf_counter()
    try:
        plain, _ = run_benchmark(em, records, BenchmarkOptions(seed=seed, batch_size=32))
        think, _ = run_benchmark(em, records, BenchmarkOptions(
            think=True, samples=think_samples, seed=seed, batch_size=32))
    finally:
        state.policy.train()
    return {"no_think": plain, "think": think, "eval_s": time.perf_counter() - start}


def summary_line(name: str, point: dict) -> str:
    a, b = point["eval"]["no_think"], point["eval"]["think"]
    return (f"[compare] {name} step {point['step']:4d} tokens {point['compute_tokens']:8d}: "
            f"acc {a['accuracy']:.3f} / think {b['accuracy']:.3f} | answer ll "
            f"{a['answer_logprob']:.3f} / think {b['answer_logprob']:.3f} | first token "
            f"{a['first_token_logprob']:.3f} / think {b['first_token_logprob']:.3f}")


def run_rlp(args, cfg, checkpoint: Path, records: list[dict], eval_steps: set[int]) -> dict:
    from megatron_rlp.data.answer_positions import AnswerPositionSampler
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    state = start_arm(cfg, checkpoint)
    r = cfg.rlp
    if args.positions == "answer":
        sampler = AnswerPositionSampler(state.corpus, r.min_prefix_tokens, r.max_prefix_tokens,
                                        cfg.train.seed, state.tokenizer.think_end)
    else:
        sampler = make_context_sampler(state)
    arm = {"start_fingerprint": fingerprint(state.policy), "steps": [], "points": []}
    timer, wall, cpu, compute = PhaseTimer(), 0.0, 0.0, 0
    while state.step < cfg.train.steps:
        t0, c0 = time.perf_counter(), time.process_time()
        m = rlp_step(state, sampler, timer)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        rows = r.contexts_per_step * r.group_size
        # m["tokens"] = sum over rows of (prefix + 1 + thought): the G rows of a context share
        # its prefix, so the contexts' input tokens are (tokens - rows * (1 + mean len)) / G.
        inputs = round((m["tokens"] - rows * (1 + m["thought_len"])) / r.group_size)
        compute += r.group_size * r.max_thought_tokens * r.contexts_per_step + inputs \
            + r.contexts_per_step
        m.update(timer.pop(), input_tokens=inputs, compute_tokens=compute, wall_s=wall)
        arm["steps"].append({k: m[k] for k in (
            "reward_mean", "reward_std", "s_pred", "s_ema", "thought_len", "closed_fraction",
            "loss", "grad_norm", "input_tokens", "compute_tokens", "wall_s")})
        if state.step % 10 == 0 or state.step == 1:
            print(f"[rlp step {state.step:4d}] reward {m['reward_mean']:+.3f} s_pred "
                  f"{m['s_pred']:.3f} s_ema {m['s_ema']:.3f} think_len {m['thought_len']:.1f} "
                  f"closed {m['closed_fraction']:.2f} | {wall:.0f}s", flush=True)
        if state.step in eval_steps:
            point = {"step": state.step, "compute_tokens": compute, "wall_s": wall,
                     "eval": evaluate(state, records, args.think_samples, args.seed)}
            arm["points"].append(point)
            print(summary_line("rlp", point), flush=True)
    arm.update(wall_s=wall, cpu_s=cpu, compute_tokens=compute)
    return arm


def run_ntp(args, cfg, checkpoint: Path, records: list[dict], matched: list[int],
            rlp_wall: float) -> dict:
    """NTP from the warm-up: evaluated at the compute-matched steps `matched` (the last is
    the RLP arm's total), then, with --wall-match, at the RLP arm's training wall time."""
    from megatron_rlp.train.ntp_step import ntp_step
    from megatron_rlp.train.samplers import make_ntp_batcher
    from megatron_rlp.train.timers import PhaseTimer

    state = start_arm(cfg, checkpoint)
    batcher, timer = make_ntp_batcher(state), PhaseTimer()
    arm = {"start_fingerprint": fingerprint(state.policy), "steps": [], "points": []}
    per_step = cfg.data.ntp_batch_size * cfg.data.ntp_seq_length
    wall, cpu, last = 0.0, 0.0, matched[-1]
    wall_point = None
    while state.step < cfg.train.steps:
        t0, c0 = time.perf_counter(), time.process_time()
        m = ntp_step(state, batcher, timer)
        timer.pop()
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        arm["steps"].append({"loss": m["loss"], "wall_s": wall})
        due = state.step in matched
        if (args.wall_match and wall_point is None and state.step > last
                and wall >= rlp_wall):
            wall_point = state.step
            due = True
        if due:
            point = {"step": state.step, "compute_tokens": state.step * per_step,
                     "wall_s": wall, "matched": "wall" if state.step > last else "compute",
                     "eval": evaluate(state, records, args.think_samples, args.seed)}
            arm["points"].append(point)
            print(summary_line(f"ntp ({point['matched']})", point), flush=True)
        if state.step >= last and (not args.wall_match or wall_point is not None):
            break
    arm.update(wall_s=wall, cpu_s=cpu, compute_tokens=state.step * per_step,
               matched_steps=matched,
               wall_matched_step=wall_point)
    if args.wall_match and wall_point is None:
        arm["wall_match_note"] = (f"stopped at the step cap {cfg.train.steps} after {wall:.0f}s "
                                  f"of the RLP arm's {rlp_wall:.0f}s")
    return arm


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), dpi=70)
    steps = report["rlp"]["steps"]
    xs = [i + 1 for i in range(len(steps))]
    rewards = [s["reward_mean"] for s in steps]
    window = max(1, len(rewards) // 15)
    smooth = [sum(chunk) / len(chunk)
              for chunk in (rewards[max(0, i - window + 1):i + 1] for i in range(len(rewards)))]
    ax = axes[0]
    ax.plot(xs, rewards, color="0.75", lw=0.8, label="reward (step)")
    ax.plot(xs, smooth, color="C3", label=f"reward ({window}-step mean)")
    ax.plot(xs, [s["s_pred"] for s in steps], color="C0", lw=0.8, label="S_pred")
    ax.plot(xs, [s["s_ema"] for s in steps], color="C2", lw=0.8, label="S_ema")
    ax.set(title="RLP training reward (nats)", xlabel="RLP step")
    ax.legend(fontsize=7)
    for ax, key, title in ((axes[1], "accuracy", "held-out exact match"),
                           (axes[2], "answer_logprob", "held-out answer log-lik (nats)"),
                           (axes[3], "first_token_logprob", "held-out first answer token")):
        w = report["warmup"]["eval"]
        for arm, color in (("rlp", "C3"), ("ntp", "C0")):
            pts = report[arm]["points"]
            x = [0] + [p["compute_tokens"] / 1e3 for p in pts]
            for mode, style in (("no_think", "--"), ("think", "-")):
                y = [w[mode][key]] + [p["eval"][mode][key] for p in pts]
                ax.plot(x, y, style, color=color, marker="o", ms=3,
                        label=f"{arm.upper()} {'with' if mode == 'think' else 'without'} thought")
        ax.set(title=title, xlabel="compute (k NTP-equivalent tokens)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_table(report: dict) -> str:
    """The README's table: held-out metrics of the warm-up and of every evaluation point."""
    rows = ["| model | steps | compute (tokens) | train wall | accuracy: no thought / thought | "
            "answer log-lik | first answer token | thoughts closed |",
            "|---|---|---|---|---|---|---|---|"]
    points = [("NTP warm-up", {"step": 0, "compute_tokens": 0, "wall_s": 0.0,
                               "eval": report["warmup"]["eval"]})]
    points += [("RLP", p) for p in report["rlp"]["points"]]
    points += [(f"NTP ({p['matched']}-matched)" if p["step"] in (
        report["ntp"]["matched_steps"][-1], report["ntp"].get("wall_matched_step")) else "NTP", p)
        for p in report["ntp"]["points"]]
    for name, p in points:
        a, b = p["eval"]["no_think"], p["eval"]["think"]
        rows.append(f"| {name} | {p['step']} | {p['compute_tokens']:,} | {p['wall_s']:.0f} s | "
                    f"{a['accuracy']:.3f} / {b['accuracy']:.3f} | {a['answer_logprob']:.2f} / "
                    f"{b['answer_logprob']:.2f} | {a['first_token_logprob']:.2f} / "
                    f"{b['first_token_logprob']:.2f} | {b['closed_fraction']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    if args.table is not None:
        try:
            report = json.loads(args.table.read_text())
            table = markdown_table(report)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --table={args.table} is not a compare.json written by this tool "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        print(table)
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
    tasks, p90 = make_task(args)
    thought = args.thought_tokens or p90
    records = read_benchmark(tasks / "heldout.jsonl")[:args.eval_items]
    try:
        wcfg = arm_config(args, tasks, "ntp", args.warmup_lr, args.warmup_steps, thought)
        rcfg = arm_config(args, tasks, "rlp", args.lr, args.rlp_steps, thought)
        # The NTP arm's step cap: compute match plus room for the wall-time match.
        ncfg = arm_config(args, tasks, "ntp", args.ntp_lr, 100 * args.rlp_steps, thought)
    except ConfigError as e:
        print(f"error: {str(e).removeprefix('error: ')}", file=sys.stderr)
        return 2
    from megatron_rlp import distributed

    distributed.initialize(wcfg)
    try:
        checkpoint, warm = warmup(args, wcfg)
        start = start_arm(rcfg, checkpoint)
        warm.update(checkpoint=str(checkpoint), fingerprint=fingerprint(start.policy),
                    eval=evaluate(start, records, args.think_samples, args.seed))
        print(summary_line("warm-up", {"step": 0, "compute_tokens": 0, "eval": warm["eval"]}),
              flush=True)
        del start
        n = args.eval_points
        eval_steps = sorted({math.ceil(args.rlp_steps * (i + 1) / n) for i in range(n)})
        rlp = run_rlp(args, rcfg, checkpoint, records, set(eval_steps))
        per_step = ncfg.data.ntp_batch_size * ncfg.data.ntp_seq_length
        matched = sorted({max(1, math.ceil(p["compute_tokens"] / per_step))
                          for p in rlp["points"]})
        ntp = run_ntp(args, ncfg, checkpoint, records, matched, rlp["wall_s"])
    finally:
        distributed.shutdown()
    report = {
        "command": " ".join(["tools/compare_rlp_ntp.py", *argv]),
        "quick": args.quick, "seed": args.seed, "eval_seed": args.seed,
        "tasks": str(tasks), "heldout_items": len(records), "think_samples": args.think_samples,
        "thought_tokens": thought, "thought_tokens_p90_of_worked_thoughts": p90,
        "positions": args.positions, "lr": args.lr, "ntp_lr": args.ntp_lr,
        "compute_rule": "rlp_tokens = G * L_think * B * steps + sum over contexts of "
                        "(prefix + 1); ntp_tokens = steps * ntp_batch_size * ntp_seq_length",
        "config": {"warmup": wcfg.to_dict(), "rlp": rcfg.to_dict(),
                   "ntp": replace(ncfg, train=replace(ncfg.train, steps=ntp["points"][-1]["step"]
                                                      )).to_dict()},
        "warmup": warm, "rlp": rlp, "ntp": ntp,
        "same_warmup": warm["fingerprint"] == rlp["start_fingerprint"] == ntp["start_fingerprint"],
        "total_wall_s": time.perf_counter() - t_start,
        # CPU seconds of this process (all threads): on a shared machine, wall / CPU says how
        # much of the time the process actually ran.
        "total_cpu_s": time.process_time() - c_start,
    }
    (args.out_dir / "compare.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, args.out_dir / "compare.png")
    print(f"[compare] wrote {args.out_dir / 'compare.json'} and compare.png in "
          f"{report['total_wall_s']:.0f}s (same warm-up: {report['same_warmup']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
