"""The summary, tables and plot of a tools/compare_rlp_ntp.py report (compare.json).

Per arm and metric: the mean over seeds and its 95% interval (eval/intervals.py). Per
comparison: the paired per-seed difference of two arms' final points and its interval; an
interval that excludes zero names the winner. The final point of an arm is its last
evaluation (NTP: the compute-matched one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rlp.eval.intervals import mean_interval, paired_difference  # noqa: E402

MODES = ("no_think", "no_think_fair", "think")
MODE_NAMES = {"no_think": "no thought (raw)", "no_think_fair": "no thought (fair)",
              "think": "with a thought"}
METRICS = ("accuracy", "answer_logprob", "first_token_logprob")


def final_point(arm: dict) -> dict:
    """The arm's last evaluation; for NTP the last compute-matched one."""
    points = [p for p in arm["points"] if p.get("matched", "compute") == "compute"]
    return points[-1]


def arm_names(report: dict) -> list[str]:
    return [f"rlp_{k}" for k in report["seeds"][0]["rlp"]] + ["ntp"]


def _arm(seed_run: dict, name: str) -> dict:
    return seed_run["ntp"] if name == "ntp" else seed_run["rlp"][name.removeprefix("rlp_")]


def _values(report: dict, name: str, mode: str, metric: str) -> list[float]:
    return [final_point(_arm(s, name))["eval"][mode][metric] for s in report["seeds"]]


def summarize(report: dict) -> dict:
    """{"arms": {arm: {mode: {metric: interval}}}, "comparisons": [...]} over the seeds."""
    arms = {name: {mode: {metric: mean_interval(_values(report, name, mode, metric))
                          for metric in METRICS} for mode in MODES}
            for name in arm_names(report)}
    for name in arms:
        first = final_point(_arm(report["seeds"][0], name))
        arms[name]["step"], arms[name]["compute_tokens"] = first["step"], first["compute_tokens"]
    base = report["base"]["eval"]
    comparisons = []
    for name in arm_names(report)[:-1]:
        for (mode_a, mode_b, what) in (
                ("think", "no_think_fair", "paper's claim: RLP with a thought vs NTP without"),
                ("think", "no_think", "the same against the raw no-thought NTP"),
                ("think", "think", "both with a thought"),
                ("no_think_fair", "no_think_fair", "both without a thought (fair)")):
            for metric in ("accuracy", "answer_logprob"):
                d = paired_difference(_values(report, name, mode_a, metric),
                                      _values(report, "ntp", mode_b, metric))
                comparisons.append({"a": f"{name} {mode_a}", "b": f"ntp {mode_b}",
                                    "what": what, "metric": metric, **d})
    for name in arm_names(report):
        for mode in MODES:
            vals = _values(report, name, mode, "accuracy")
            d = mean_interval([v - base[mode]["accuracy"] for v in vals])
            comparisons.append({"a": f"{name} {mode}", "b": f"base {mode}",
                                "what": "gain over the base", "metric": "accuracy", **d})
    return {"arms": arms, "comparisons": comparisons}


def _fmt(iv: dict, digits: int = 3) -> str:
    if iv["half"] is None:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} ± {iv['half']:.{digits}f}"


def markdown_tables(report: dict) -> str:
    """The README's two tables: every arm's final held-out metrics (mean ± 95% half-width
    over seeds), and the paired comparisons."""
    s = report.get("summary") or summarize(report)
    base = report["base"]["eval"]
    rows = ["| model | steps | compute (tokens) | accuracy: no thought raw / fair / with "
            "thought | answer log-lik: raw / fair / with thought |", "|---|---|---|---|---|"]
    rows.append("| base (annealed) | 0 | 0 | " + " / ".join(
        f"{base[m]['accuracy']:.3f}" for m in MODES) + " | " + " / ".join(
        f"{base[m]['answer_logprob']:.2f}" for m in MODES) + " |")
    for name, arm in s["arms"].items():
        label = "NTP (compute-matched)" if name == "ntp" else \
            f"RLP, reward k={name.removeprefix('rlp_k')}"
        rows.append(f"| {label} | {arm['step']} | {arm['compute_tokens']:,} | " + " / ".join(
            _fmt(arm[m]["accuracy"]) for m in MODES) + " | " + " / ".join(
            _fmt(arm[m]["answer_logprob"], 2) for m in MODES) + " |")
    rows += ["", "| comparison (a - b, paired over seeds) | metric | a - b | 95% interval | "
             "verdict |", "|---|---|---|---|---|"]
    for c in s["comparisons"]:
        if c["what"] == "gain over the base" and not c["a"].endswith("think"):
            continue
        interval = "-" if c["half"] is None else f"[{c['low']:+.3f}, {c['high']:+.3f}]"
        verdict = {"a": "a wins", "b": "b wins", "tie": "no difference shown"}.get(
            c.get("verdict", ""), "")
        rows.append(f"| {c['a']} - {c['b']} ({c['what']}) | {c['metric']} | "
                    f"{c['mean']:+.3f} | {interval} | {verdict} |")
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    """Accuracy and answer log-likelihood of the base and every arm in each mode, with 95%
    intervals over seeds, and the RLP arms' training reward (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.get("summary") or summarize(report)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), dpi=70)
    names = ["base", *s["arms"]]
    width = 0.8 / len(names)
    for ax, metric, title in ((axes[0], "accuracy", "held-out accuracy"),
                              (axes[1], "answer_logprob", "held-out answer log-lik (nats)")):
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(MODES))]
            if name == "base":
                ys = [report["base"]["eval"][m][metric] for m in MODES]
                errs = [0.0] * len(MODES)
            else:
                ivs = [s["arms"][name][m][metric] for m in MODES]
                ys = [iv["mean"] for iv in ivs]
                errs = [iv["half"] or 0.0 for iv in ivs]
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=name.replace("_", " "))
        ax.set_xticks(range(len(MODES)), [MODE_NAMES[m] for m in MODES])
        ax.set(title=f"{title}, 95% intervals over {len(report['seeds'])} seeds")
        ax.legend(fontsize=7)
    ax = axes[2]
    for key in report["seeds"][0]["rlp"]:
        runs = [[st["reward_mean"] for st in seed["rlp"][key]["steps"]]
                for seed in report["seeds"]]
        mean = [sum(v) / len(v) for v in zip(*runs, strict=True)]
        ax.plot(range(1, len(mean) + 1), mean, label=f"RLP {key}: reward (mean over seeds)")
    ax.set(title="RLP training reward (nats)", xlabel="RLP step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> None:
    """Summary into `report`, then OUT_DIR/compare.json and compare.png; prints the tables."""
    report["summary"] = summarize(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, out_dir / "compare.png")
    print(markdown_tables(report), flush=True)
    print(f"[compare] wrote {out_dir / 'compare.json'} and compare.png in "
          f"{report['total_wall_s']:.0f}s (same base: {report['same_base']})", flush=True)


def merge(paths: list[Path], out_dir: Path) -> str | None:
    """Join reports of one base (seeds run by separate processes) into one; an error line
    when they do not share the base and the held-out items, or repeat a seed."""
    try:
        reports = [json.loads(p.read_text()) for p in paths]
    except (OSError, ValueError) as e:
        return f"--merge: {e}"
    first = reports[0]
    for path, r in zip(paths, reports, strict=True):
        if (r["base"]["fingerprint"], r["heldout_items"], sorted(r["seeds"][0]["rlp"])) != (
                first["base"]["fingerprint"], first["heldout_items"],
                sorted(first["seeds"][0]["rlp"])):
            return (f"--merge={path} (allowed: reports of the same base, held-out items and "
                    "RLP arms)")
    seeds = [s for r in reports for s in r["seeds"]]
    if len({s["seed"] for s in seeds}) != len(seeds):
        return f"--merge={' '.join(map(str, paths))} (allowed: reports of distinct seeds)"
    merged = {**first, "seeds": sorted(seeds, key=lambda s: s["seed"]),
              "command": [r["command"] for r in reports],
              "same_base": all(r["same_base"] for r in reports),
              "total_wall_s": max(r["total_wall_s"] for r in reports),
              "total_cpu_s": sum(r["total_cpu_s"] for r in reports)}
    write_report(merged, out_dir)
    return None
