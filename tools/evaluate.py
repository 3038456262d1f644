"""Downstream evaluation of a megatron-rlp checkpoint on local JSONL benchmarks.

    torchrun --nproc-per-node 2 tools/evaluate.py --load runs/demo/ntp \
        --benchmark runs/tasks/heldout.jsonl --out runs/eval/ntp.json [--think] \
        [--samples 4] [section.key=value ...]

Each benchmark line is {"question": ..., "answer": ...} (GSM8K-style `#### 72` answers work);
the model sees `--prompt-template` (default "Question: {question}\\nAnswer: ") and answers
greedily, or `--samples n` times at `--temperature` (pass@k for k <= n), or, with `--think`,
after each of n sampled thoughts (`rlp.max_thought_tokens`, `rlp.temperature`). It also
reports the gold answer's log-likelihood with and without the thought. The model and its
thought settings come from the checkpoint; overrides set the layout (`parallel.*`), the
device, or the thought (`rlp.max_thought_tokens=32`). Any layout the training supports works
(data parallel deals out items). Prints one line per benchmark; `--out` writes the metrics
(and, with `--details`, every item's outputs) as JSON. Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from megatron_rlp.eval.tasks import PROMPT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", help="a train.save directory or a step_* checkpoint")
    p.add_argument("--config", help="YAML run config (instead of the checkpoint's; without "
                   "--load: a freshly initialised model)")
    p.add_argument("--benchmark", action="append", required=True,
                   help="JSONL file of {question, answer}; repeat for several")
    p.add_argument("--out", help="write metrics as JSON here")
    p.add_argument("--details", action="store_true", help="also write per-item outputs")
    p.add_argument("--think", action="store_true", help="answer after a sampled thought")
    p.add_argument("--samples", type=int, default=1, help="answers (thoughts) per item")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="answer sampling temperature without --think (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--stop", action="append", help="stop text (default: a newline)")
    p.add_argument("--prompt-template", default=PROMPT)
    p.add_argument("--match", choices=("numeric", "exact"), default="numeric")
    p.add_argument("--extract", choices=("first", "last"), default="first",
                   help="which number of an output is the answer (last: chain of thought)")
    p.add_argument("--no-loglik", action="store_true", help="skip answer log-likelihoods")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="first N items of each benchmark (N >= 1; "
                   "default: all)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the run's train.seed)")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.limit is not None and args.limit < 1:  # a cap: 0 must not mean "no cap"
        if rank0:
            print(f"error: --limit={args.limit} (allowed: an integer >= 1; leave it out for all "
                  "items)", file=sys.stderr, flush=True)
        return 2
    # As pretrain_rlp.py: Megatron warns at import about kernels a CPU run never uses.
    from megatron_rlp.startup import check_machine, quiet_megatron

    quiet_megatron()
    from megatron_rlp.checkpoint import CheckpointError, resolve_checkpoint
    from megatron_rlp.config import ConfigError
    from megatron_rlp.eval.benchmark import BenchmarkOptions, read_benchmark
    from megatron_rlp.eval.loading import eval_config

    def fail(message: str) -> int:
        if rank0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return 2

    opts = BenchmarkOptions(think=args.think, samples=args.samples,
                            temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens,
                            stop=tuple(args.stop) if args.stop else ("\n",),
                            prompt_template=args.prompt_template, match=args.match,
                            extract=args.extract, loglik=not args.no_loglik,
                            batch_size=args.batch_size, seed=args.seed)
    try:
        opts.validate()
        benchmarks = {b: read_benchmark(b) for b in args.benchmark}
        # Resolved here, so that a bad path is named as the user gave it (--load, not the
        # train.load key it becomes); the resolved step directory is what is loaded below.
        load = None if args.load is None else str(resolve_checkpoint(args.load, "--load"))
        cfg = eval_config(load, args.config, tuple(args.overrides),
                          int(os.environ.get("WORLD_SIZE", "1")))
        check_machine(cfg)  # TE, CUDA, FlexAttention against this machine
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        return fail(str(e).removeprefix("error: "))

    from megatron_rlp import distributed
    from megatron_rlp.eval.benchmark import run_benchmark
    from megatron_rlp.eval.loading import load_eval_model

    distributed.initialize(cfg)
    try:
        em = load_eval_model(cfg, load, cfg.train.checkpoint_checksums)
        report = {"checkpoint": em.source, "think": opts.think, "samples": opts.samples,
                  "max_thought_tokens": cfg.rlp.max_thought_tokens if opts.think else 0,
                  "benchmarks": {}}
        for path, records in benchmarks.items():
            records = records[:args.limit]  # None: all
            metrics, details = run_benchmark(em, records, opts)
            entry = {"metrics": metrics}
            if args.details:
                entry["items"] = details
            report["benchmarks"][path] = entry
            if rank0:
                line = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                if isinstance(v, float))
                print(f"[eval] {path} ({em.source}, think={opts.think}, n={opts.samples}): "
                      f"items={metrics['items']} {line}", flush=True)
        if rank0 and args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    except (CheckpointError, ValueError) as e:
        return fail(str(e))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
