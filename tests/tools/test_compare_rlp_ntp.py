"""tools/compare_rlp_ntp.py --quick, as `make test` runs it: an annealed base shared by every
arm of every seed (same weights fingerprint), a thought-free continuation corpus separate
from the warm-up corpus, RLP arms per reward horizon and compute-matched NTP per seed, the
raw, fair and thinking evaluations, means with intervals over seeds, the tables and the PNG;
a second run reuses the cached base; bad input is one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/compare_rlp_ntp.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ENV)


def tool():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "tools" / "compare_rlp_ntp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_anneal_schedule_ends_at_the_arms_lr():
    lr = [tool().anneal_lr(s, 4, 3, 1e-3, 3e-5) for s in range(1, 8)]
    assert lr[:4] == [1e-3] * 4
    assert lr[4] > lr[5] > lr[6] == pytest.approx(3e-5)


def test_quick_comparison_over_seeds(tmp_path):
    out = tmp_path / "cmp"
    proc = run("--quick", "--out-dir", str(out), "--threads", "1", "--reward-tokens", "1,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # The base: 4 warm-up steps at 1e-3, 2 annealing steps down to the arms' lr.
    base = report["base"]
    assert base["reused"] is False and base["steps"] == 6 and len(base["loss"]) == 6
    assert base["lr"][:4] == [1e-3] * 4 and base["lr"][-1] == pytest.approx(3e-5)
    # Warm-up corpus with worked thoughts; a separate continuation corpus without any.
    warm = Path(report["tasks"]["warmup"]) / "train.jsonl"
    cont = Path(report["tasks"]["continue"]) / "train.jsonl"
    assert warm != cont and "<think>" in warm.read_text() and "<think>" not in cont.read_text()
    assert warm.read_text() != cont.read_text()

    # Every arm of every seed starts from the one base.
    seeds = report["seeds"]
    assert [s["seed"] for s in seeds] == [1234, 1235] and report["same_base"] is True
    for s in seeds:
        assert set(s["rlp"]) == {"k1", "k3"}
        arms = [*s["rlp"].values(), s["ntp"]]
        assert {a["start_fingerprint"] for a in arms} == {base["fingerprint"]}
        b = report["settings"]["contexts"]
        g, length = report["settings"]["group_size"], report["thought_tokens"]
        for k, arm in ((1, s["rlp"]["k1"]), (3, s["rlp"]["k3"])):
            first = arm["steps"][0]  # compute: G L B + inputs + k per context
            assert arm["reward_tokens"] == k
            assert first["compute_tokens"] == g * length * b + first["input_tokens"] + k * b
        # NTP: at least the largest RLP arm's compute, by less than one step.
        per_step = 4 * 128  # quick: data.ntp_batch_size=4, ntp_seq_length 128
        most = max(a["compute_tokens"] for a in s["rlp"].values())
        assert s["ntp"]["compute_tokens"] - per_step < most <= s["ntp"]["compute_tokens"]
        for point in [*(p for a in arms for p in a["points"])]:
            ev = point["eval"]
            assert set(ev) >= {"no_think", "no_think_fair", "think"}
            for mode in ("no_think", "no_think_fair", "think"):
                m = ev[mode]
                assert m["items"] == report["heldout_items"] == 3 and 0 <= m["accuracy"] <= 1
                assert m["accuracy_se"] >= 0 and m["answer_logprob"] < 0
            # the fair baseline only renormalises the first token: never less likely
            assert ev["no_think_fair"]["first_token_logprob"] >= \
                ev["no_think"]["first_token_logprob"] - 1e-5

    # Means and intervals over the seeds; paired differences.
    summary = report["summary"]
    acc = [s["rlp"]["k1"]["points"][-1]["eval"]["think"]["answer_logprob"] for s in seeds]
    iv = summary["arms"]["rlp_k1"]["think"]["answer_logprob"]
    assert iv["mean"] == pytest.approx(sum(acc) / 2) and iv["n"] == 2
    assert iv["low"] <= iv["mean"] <= iv["high"]
    claim = next(c for c in summary["comparisons"] if c["a"] == "rlp_k3 think"
                 and c["b"] == "ntp no_think_fair" and c["metric"] == "answer_logprob")
    ntp = [s["ntp"]["points"][-1]["eval"]["no_think_fair"]["answer_logprob"] for s in seeds]
    rlp = [s["rlp"]["k3"]["points"][-1]["eval"]["think"]["answer_logprob"] for s in seeds]
    assert claim["mean"] == pytest.approx(sum(rlp) / 2 - sum(ntp) / 2)
    assert claim["verdict"] in ("a", "b", "tie")

    table = run("--table", str(out / "compare.json"))
    assert table.returncode == 0, table.stderr
    assert "| base (annealed) | 0 | 0 |" in table.stdout
    assert "| RLP, reward k=3 |" in table.stdout and "NTP (compute-matched)" in table.stdout
    assert "paper's claim" in table.stdout

    # Another seed in another process: the base comes from the cache; --merge joins them.
    out2 = tmp_path / "cmp2"
    again = run("--quick", "--out-dir", str(out2), "--threads", "1", "--seed-indices", "2",
                "--reward-tokens", "1,3", "--cache-dir", str(out / "cache"))
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out2 / "compare.json").read_text())
    assert second["base"]["reused"] is True and [s["seed"] for s in second["seeds"]] == [1236]
    assert second["seeds"][0]["ntp"]["start_fingerprint"] == base["fingerprint"]
    assert second["base"]["eval"] == base["eval"]  # the cached base evaluation
    assert second["summary"]["arms"]["ntp"]["think"]["accuracy"]["half"] is None
    merged = tmp_path / "merged"
    proc = run("--merge", str(out / "compare.json"), str(out2 / "compare.json"),
               "--out-dir", str(merged))
    assert proc.returncode == 0, proc.stderr[-3000:]
    joined = json.loads((merged / "compare.json").read_text())
    assert [s["seed"] for s in joined["seeds"]] == [1234, 1235, 1236]
    assert joined["summary"]["arms"]["rlp_k3"]["think"]["accuracy"]["n"] == 3
    assert (merged / "compare.png").is_file()
    twice = run("--merge", str(out / "compare.json"), str(out / "compare.json"),
                "--out-dir", str(merged))
    assert twice.returncode == 2 and "distinct seeds" in twice.stderr


@pytest.mark.parametrize("flag, value, allowed", [
    ("--eval-points", "0", "1 <= N <= --rlp-steps"),
    ("--seeds", "0", "an integer >= 1"),
    ("--reward-tokens", "1,0", "distinct integers >= 1, comma-separated"),
    ("--continue-think-rate", "1.5", "a fraction in [0, 1]"),
    ("--seed-indices", "0,0", "distinct integers >= 0, comma-separated"),
])
def test_bad_option_is_one_line(tmp_path, flag, value, allowed):
    proc = run("--quick", "--out-dir", str(tmp_path), flag, value)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {flag}={value} (allowed: {allowed})"
