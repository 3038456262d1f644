"""Print a start-vs-end table of a run's metrics JSONL files (the `make demo` summary).

    python tools/summarize_metrics.py runs/demo/ntp.jsonl runs/demo/rlp.jsonl

"start" and "end" average the first and last `--window` steps of each file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("loss", "reward_mean", "thought_len", "s_ema", "s_pred", "clip_fraction",
           "step_time")


def read(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"error: {path} has no metrics")
    return rows


def summarize(path: Path, window: int) -> list[str]:
    rows = read(path)
    head, tail = rows[:window], rows[-window:]
    out = [f"{path.name}: {rows[0]['objective']} steps {rows[0]['step']}-{rows[-1]['step']}"]
    out.append(f"  {'metric':<14}{'start':>10}{'end':>10}{'change':>10}")
    for key in COLUMNS:
        if key not in rows[0]:
            continue
        a = sum(r[key] for r in head) / len(head)
        b = sum(r[key] for r in tail) / len(tail)
        out.append(f"  {key:<14}{a:>10.4f}{b:>10.4f}{b - a:>+10.4f}")
    total = sum(r["step_time"] for r in rows)
    phases = {k[2:]: sum(r.get(k, 0.0) for r in rows) / len(rows)
              for k in rows[0] if k.startswith("t_")}
    split = ", ".join(f"{k} {v:.2f}s" for k, v in phases.items())
    out.append(f"  {len(rows)} steps in {total:.1f}s; mean step split: {split}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args(argv)
    for f in args.files:
        print("\n".join(summarize(f, args.window)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
