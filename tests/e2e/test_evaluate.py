"""tools/evaluate.py as users run it: a tiny model trained a few NTP steps on the generated
task, evaluated on its held-out split from the checkpoint, greedy and with thoughts, on one
process and under torchrun layouts (TP=2, PP=2, DP=2) that must give the same answers,
thoughts and log-likelihoods (PP=2 is marked slow); bad input is one line and exit 2 (the
option and file checks themselves are unit tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
MODEL = ("model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.max_sequence_length=160", "rlp.max_prefix_tokens=96",
         "rlp.max_thought_tokens=8", "device.num_threads=1")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint dir, held-out benchmark): 4 NTP steps on 60 generated documents."""
    tmp = tmp_path_factory.mktemp("eval")
    made = run([sys.executable, "tools/make_tasks.py", "--out-dir", str(tmp / "tasks"),
                "--num-docs", "60", "--num-heldout", "3"])
    assert made.returncode == 0, made.stderr
    train = run([sys.executable, "pretrain_rlp.py", "--config", "examples/configs/tiny_cpu.yaml",
                 *MODEL, "train.objective=ntp", "train.steps=4", "data.ntp_batch_size=4",
                 f"data.corpus={tmp / 'tasks' / 'train.jsonl'}", f"train.save={tmp / 'ckpt'}"])
    assert train.returncode == 0, train.stderr[-3000:]
    return tmp / "ckpt", tmp / "tasks" / "heldout.jsonl"


def evaluate(ckpt: Path, bench: Path, out: Path, *extra: str, launcher=(sys.executable,)
             ) -> dict:
    proc = run([*launcher, "tools/evaluate.py", "--load", str(ckpt), "--benchmark", str(bench),
                "--out", str(out), "--details", "--max-new-tokens", "6", *extra,
                "device.num_threads=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[eval]") == 1, proc.stdout
    return json.loads(out.read_text())["benchmarks"][str(bench)]


def test_greedy_evaluation_of_a_checkpoint(trained, tmp_path):
    ckpt, bench = trained
    report = evaluate(ckpt, bench, tmp_path / "greedy.json")
    m, items = report["metrics"], report["items"]
    gold = [json.loads(line)["answer"] for line in bench.read_text().splitlines()]
    assert m["items"] == len(items) == len(gold) == 9
    assert [it["gold"] for it in items] == gold
    assert m["accuracy"] == sum(it["correct"][0] for it in items) / 9 == m["pass@1"]
    assert set(m["by_kind"]) == {"add", "chain", "lookup"}
    assert m["answer_logprob"] < m["first_token_logprob"] < 0
    assert all("\n" not in it["outputs"][0] for it in items)  # cut at the stop text


LAYOUTS = {
    "tp2": ("parallel.tensor_model_parallel_size=2",),
    "pp2": ("parallel.pipeline_model_parallel_size=2",),
    "dp2": (),
}


@pytest.fixture(scope="module")
def one_rank_thinking(trained, tmp_path_factory):
    ckpt, bench = trained
    out = tmp_path_factory.mktemp("one") / "think.json"
    return evaluate(ckpt, bench, out, "--think", "--samples", "2")


@pytest.mark.parametrize("layout", [
    "tp2", "dp2", pytest.param("pp2", marks=pytest.mark.slow)])
def test_layouts_give_the_same_evaluation(trained, one_rank_thinking, tmp_path, layout):
    """Two ranks in each layout: the same thoughts, answers and (within fp32 noise) the same
    log-likelihoods as one process."""
    ckpt, bench = trained
    launcher = (TORCHRUN, "--standalone", "--nproc-per-node", "2")
    got = evaluate(ckpt, bench, tmp_path / "think.json", "--think", "--samples", "2",
                   *LAYOUTS[layout], launcher=launcher)
    want = one_rank_thinking
    for a, b in zip(got["items"], want["items"], strict=True):
        assert a["thought_ids"] == b["thought_ids"] and a["outputs"] == b["outputs"]
        assert a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-3)
    assert got["metrics"]["accuracy"] == want["metrics"]["accuracy"]
    assert 0 < want["metrics"]["thought_tokens"] <= 8


def test_fair_baseline_on_one_rank_and_tp2(trained, tmp_path):
    """`--ban-think`: no answer opens a thought, every first answer token is at least as
    likely as in the raw baseline (`<think>` renormalised out), and two tensor-parallel ranks
    (the ban applied on the vocabulary shard holding `<think>`) give the same answers."""
    ckpt, bench = trained
    raw = evaluate(ckpt, bench, tmp_path / "raw.json")
    fair = evaluate(ckpt, bench, tmp_path / "fair.json", "--ban-think")
    for a, b in zip(fair["items"], raw["items"], strict=True):
        assert not a["outputs"][0].startswith("<think>")
        assert a["first_token_logprob"] >= b["first_token_logprob"] - 1e-5
        # only the first token is renormalised: the rest of the answer scores the same
        assert (a["answer_logprob"] - a["first_token_logprob"]) == pytest.approx(
            b["answer_logprob"] - b["first_token_logprob"], abs=1e-4)
    tp2 = evaluate(ckpt, bench, tmp_path / "tp2.json", "--ban-think",
                   "parallel.tensor_model_parallel_size=2",
                   launcher=(TORCHRUN, "--standalone", "--nproc-per-node", "2"))
    for a, b in zip(tp2["items"], fair["items"], strict=True):
        assert a["outputs"] == b["outputs"]
        assert a["first_token_logprob"] == pytest.approx(b["first_token_logprob"], abs=1e-3)


@pytest.mark.parametrize("args, needle", [
    (("--load", "/nonexistent/ckpt", "--benchmark", "BENCH"), "/nonexistent/ckpt"),
    (("--load", "CKPT", "--benchmark", "BENCH", "parallel.tensor_model_parallel_size=3"),
     "parallel.tensor_model_parallel_size"),
    (("--load", "CKPT", "--benchmark", "BENCH", "--think", "--ban-think"), "ban_think"),
])
def test_bad_input_is_one_line(trained, args, needle):
    ckpt, bench = trained
    args = [str(ckpt) if a == "CKPT" else str(bench) if a == "BENCH" else a for a in args]
    proc = run([sys.executable, "tools/evaluate.py", *args], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
