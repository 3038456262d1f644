"""tools/compare_rlp_ntp.py --quick, as `make test` runs it: both arms start from one NTP
warm-up (same weights fingerprint), the JSON holds every field the README's table reads,
the PNG is written, a second run reuses the cached warm-up, and bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/compare_rlp_ntp.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV)


def test_quick_comparison_writes_json_and_png(tmp_path):
    out = tmp_path / "cmp"
    proc = run("--quick", "--out-dir", str(out), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # Both arms started from the one warm-up checkpoint, with identical weights.
    warm, rlp, ntp = report["warmup"], report["rlp"], report["ntp"]
    assert report["same_warmup"] is True
    assert warm["fingerprint"] == rlp["start_fingerprint"] == ntp["start_fingerprint"]
    assert warm["reused"] is False and warm["steps"] == 6 and len(warm["loss"]) == 6

    # RLP: per-step reward curve and compute; points evaluated with and without a thought.
    assert len(rlp["steps"]) == 2 and rlp["points"][-1]["step"] == 2
    g, b = report["config"]["rlp"]["rlp"]["group_size"], report["config"]["rlp"]["rlp"][
        "contexts_per_step"]
    first = rlp["steps"][0]
    assert first["compute_tokens"] == g * report["thought_tokens"] * b + first["input_tokens"] + b
    assert first["input_tokens"] >= 16 * b  # rlp.min_prefix_tokens per context
    # Compute matching: the first NTP point has at least the RLP arm's tokens, by < 1 step.
    per_step = report["config"]["ntp"]["data"]["ntp_batch_size"] * \
        report["config"]["ntp"]["data"]["ntp_seq_length"]
    matched = [p for p in ntp["points"] if p["matched"] == "compute"]
    assert matched[-1]["compute_tokens"] - per_step < rlp["compute_tokens"] \
        <= matched[-1]["compute_tokens"]
    # The wall-time point trained at least as long as the RLP arm did.
    walls = [p for p in ntp["points"] if p["matched"] == "wall"]
    assert walls and walls[0]["wall_s"] >= rlp["wall_s"]
    for point in [warm, *rlp["points"], *ntp["points"]]:
        ev = point["eval"]
        assert ev["no_think"]["items"] == ev["think"]["items"] == report["heldout_items"] == 3
        for mode in ("no_think", "think"):
            m = ev[mode]
            assert 0 <= m["accuracy"] <= 1 and m["answer_logprob"] < 0
            assert m["first_token_logprob"] < 0 and set(m["by_kind"]) == {"add", "chain",
                                                                            "lookup"}
        assert ev["think"]["thought_tokens"] > 0 and "thought_tokens" not in ev["no_think"]
    assert report["total_wall_s"] > 0 and rlp["wall_s"] > 0
    # The README's table from the JSON: a row per evaluated model.
    table = run("--table", str(out / "compare.json"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 2 + 1 + len(rlp["points"]) + len(ntp["points"])
    assert lines[2].startswith("| NTP warm-up | 0 |") and "(compute-matched)" in table.stdout

    # Same settings again: the warm-up comes from the cache, the arms start from it.
    again = run("--quick", "--out-dir", str(out), "--threads", "1", "--no-wall-match")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "compare.json").read_text())
    assert second["warmup"]["reused"] is True
    assert second["rlp"]["start_fingerprint"] == warm["fingerprint"]
    assert all(p["matched"] == "compute" for p in second["ntp"]["points"])


def test_bad_option_is_one_line(tmp_path):
    proc = run("--quick", "--out-dir", str(tmp_path), "--eval-points", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --eval-points=0 (allowed: 1 <= N <= --rlp-steps)"
