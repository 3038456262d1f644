"""Plot a run's metrics JSONL (train.metrics_file) as a PNG: reward, loss, clip fraction,
thought length, the two next-token scores and throughput, one panel each.

    python tools/plot_metrics.py runs/demo/rlp.jsonl --out runs/demo/rlp.png
    python tools/plot_metrics.py a.jsonl b.jsonl --out compare.png --smooth 10

Several files (or objectives within one file) are overlaid, labelled by file name. Raw
values are drawn faintly, with an exponential moving average (`--smooth`, in steps) on top.
Needs matplotlib (`pip install -e ".[plot]"`); uses the Agg backend, no display.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# (title, y label, [(metric, legend suffix)])
PANELS = (
    ("reward (information gain)", "nats", [("reward_mean", "")]),
    ("loss", "", [("loss", "")]),
    ("clip fraction", "fraction of thought tokens", [("clip_fraction", "")]),
    ("thought length", "tokens", [("thought_len", "")]),
    ("next-token log-prob", "nats", [("s_pred", " S_pred (with thought)"),
                                     ("s_ema", " S_ema (teacher, no thought)")]),
    ("throughput", "tokens / s", [("tokens_per_s", "")]),
)


def read_series(path: Path) -> dict[str, list[dict]]:
    """Rows of a metrics JSONL grouped by objective, sorted by step (last write of a step
    wins: a resumed run rewrites the steps after its checkpoint)."""
    by_obj: dict[str, dict[int, dict]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{n} is not JSON; skipped", file=sys.stderr)
            continue
        if isinstance(row, dict) and "step" in row:
            by_obj.setdefault(row.get("objective", "?"), {})[int(row["step"])] = row
    return {obj: [rows[s] for s in sorted(rows)] for obj, rows in by_obj.items()}


def ema(values: list[float], span: float) -> list[float]:
    """Exponential moving average with alpha = 2 / (span + 1); NaNs are carried over."""
    if span <= 1:
        return list(values)
    alpha, out, acc = 2.0 / (span + 1.0), [], None
    for v in values:
        if math.isfinite(v):
            acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc if acc is not None else math.nan)
    return out


def plot(files: list[Path], out: Path, smooth: float = 0.0, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []  # (label, rows)
    for f in files:
        groups = read_series(f)
        for obj, rows in groups.items():
            label = f.stem if len(groups) == 1 else f"{f.stem}:{obj}"
            series.append((label, rows))
    if not any(rows for _, rows in series):
        raise SystemExit(f"error: no metrics rows in {', '.join(map(str, files))}")
    if smooth <= 0:  # default: about 1/20 of the longest run
        smooth = max(1.0, max(len(rows) for _, rows in series) / 20)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, ylabel, metrics) in zip(axes.flat, PANELS, strict=True):
        drawn = 0
        for i, (label, rows) in enumerate(series):
            for j, (key, suffix) in enumerate(metrics):
                pts = [(r["step"], float(r[key])) for r in rows
                       if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                steps, vals = zip(*pts, strict=True)
                color = colors[(i * len(metrics) + j) % len(colors)]
                ax.plot(steps, vals, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, ema(list(vals), smooth), color=color, linewidth=1.8,
                        label=f"{label}{suffix}")
                if key == "reward_mean" and all("reward_std" in r for r in rows):
                    sd = [float(r["reward_std"]) for r in rows if "reward_mean" in r]
                    if len(sd) == len(vals):
                        m = ema(list(vals), smooth)
                        s = ema(sd, smooth)
                        ax.fill_between(steps, [a - b for a, b in zip(m, s, strict=True)],
                                        [a + b for a, b in zip(m, s, strict=True)],
                                        color=color, alpha=0.08, linewidth=0)
                drawn += 1
        ax.set_title(name)
        ax.set_xlabel("step")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if name.startswith("reward"):
            ax.axhline(0.0, color="black", linewidth=0.6, alpha=0.5)
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not in these metrics", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.suptitle(title or ", ".join(str(f) for f in files)
                 + (f" (EMA over {smooth:.0f} steps)" if smooth > 1 else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="metrics JSONL files")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA span in steps (default: 1/20 of the run; 1 = raw only)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    for f in args.files:
        if not f.is_file():
            print(f"error: {f} does not exist", file=sys.stderr)
            return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: matplotlib is not installed (pip install -e '.[plot]')", file=sys.stderr)
        return 2
    path = plot(args.files, args.out, args.smooth, args.title)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
