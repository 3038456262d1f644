"""Writes the reasoning task (megatron_rlp/eval/tasks.py): a training corpus and held-out
benchmarks that share formats, not instances. Deterministic for a given seed.

    python tools/make_tasks.py --out-dir runs/tasks
    # runs/tasks/train.jsonl            corpus ({"text", "answer_offsets"} per document):
    #                                   data.corpus=runs/tasks/train.jsonl
    # runs/tasks/heldout.jsonl          {"question", "answer", "kind", "key", "work"}, all kinds
    # runs/tasks/heldout_<kind>.jsonl   the same, one kind each
    # runs/tasks/lm_eval/               lm-eval task YAMLs over heldout.jsonl (no downloads)

The shipped data/corpus.jsonl is a different generator (tools/make_corpus.py) and is not
touched.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rlp.eval.lm_eval_tasks import write_lm_eval_tasks  # noqa: E402
from megatron_rlp.eval.task_space import split_shortfall  # noqa: E402
from megatron_rlp.eval.tasks import (  # noqa: E402 - after the path fix-up
    KINDS,
    benchmark_record,
    corpus_document,
    items,
)


def write_jsonl(path: Path, records) -> int:
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    return n


def space_error(args: argparse.Namespace, kinds: tuple[str, ...]) -> str | None:
    """One line when a split has fewer distinct instances than asked for (the drawing would
    never end), naming the flag, its value and the most it allows; else None."""
    k, total = len(kinds), args.num_docs * args.items_per_doc
    split = dict(held_out_percent=args.held_out_percent, digits=args.digits)
    settings = f"--digits {args.digits} and --held-out-percent {args.held_out_percent}"
    # The training stream takes kinds in turn: kind i is drawn ceil((total - i) / k) times.
    short = {kind: s for i, kind in enumerate(kinds) if (s := split_shortfall(
        kind, -(-(total - i) // k), held_out=False, **split)) is not None}
    if short:
        most = min(short[kind] * k + i for i, kind in enumerate(kinds) if kind in short)
        kind = min(short, key=short.get)
        return (f"--num-docs={args.num_docs} (allowed: at most {most // args.items_per_doc} "
                f"with --items-per-doc {args.items_per_doc}: the training split has "
                f"{short[kind]} {kind} instances with {settings})")
    short = {kind: s for kind in kinds if (s := split_shortfall(
        kind, args.num_heldout, held_out=True, **split)) is not None}
    if short:
        kind = min(short, key=short.get)
        return (f"--num-heldout={args.num_heldout} (allowed: at most {short[kind]}: the "
                f"held-out split has {short[kind]} {kind} instances with {settings})")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/tasks"))
    parser.add_argument("--num-docs", type=int, default=2000, help="training documents")
    parser.add_argument("--items-per-doc", type=int, default=6)
    parser.add_argument("--think-rate", type=float, default=0.5,
                        help="share of training items written with their working as a thought")
    parser.add_argument("--num-heldout", type=int, default=200, help="held-out items per kind")
    parser.add_argument("--held-out-percent", type=float, default=10.0,
                        help="share of all instances reserved for the held-out split")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--digits", type=int, default=3, help="operand digits of `add`")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [(flag, value, allowed) for flag, value, allowed, good in [
        ("--kinds", args.kinds, f"a comma-separated subset of {','.join(KINDS)}",
         kinds and set(kinds) <= set(KINDS)),
        ("--digits", args.digits, "an integer >= 1", args.digits >= 1),
        ("--num-docs", args.num_docs, "an integer >= 1", args.num_docs >= 1),
        ("--items-per-doc", args.items_per_doc, "an integer >= 1", args.items_per_doc >= 1),
        ("--think-rate", args.think_rate, "a fraction in [0, 1]", 0 <= args.think_rate <= 1),
        ("--num-heldout", args.num_heldout, "an integer >= 1", args.num_heldout >= 1),
        ("--held-out-percent", args.held_out_percent, "a percentage in (0, 100)",
         0 < args.held_out_percent < 100),
    ] if not good]
    if bad:
        flag, value, allowed = bad[0]
        print(f"error: {flag}={value} (allowed: {allowed})", file=sys.stderr)
        return 2
    if (error := space_error(args, kinds)) is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    common = dict(held_out_percent=args.held_out_percent, kinds=kinds, digits=args.digits)

    rng = random.Random(args.seed)
    train = items(args.seed, held_out=False, **common)
    docs = write_jsonl(out / "train.jsonl", (
        corpus_document(train, rng, args.items_per_doc, args.think_rate)
        for _ in range(args.num_docs)))
    per_kind = []
    for kind in kinds:
        stream = items(args.seed + 1, held_out=True, **{**common, "kinds": (kind,)})
        records = [benchmark_record(next(stream)) for _ in range(args.num_heldout)]
        write_jsonl(out / f"heldout_{kind}.jsonl", records)
        per_kind.append(records)
    # Kinds interleaved, so the first N lines (evaluate.py --limit N) hold every kind.
    held = [r for group in zip(*per_kind, strict=True) for r in group]
    write_jsonl(out / "heldout.jsonl", held)
    write_lm_eval_tasks(out / "lm_eval", out / "heldout.jsonl")
    print(f"wrote {docs} training documents ({args.items_per_doc} items each) to "
          f"{out / 'train.jsonl'}; {len(held)} held-out items ({', '.join(kinds)}) to "
          f"{out / 'heldout.jsonl'}; lm-eval tasks in {out / 'lm_eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
