"""tools/preprocess_data.py turns a JSONL file into an indexed dataset that pretrain_rlp.py
trains on (RLP and NTP, blends, splits); held-out validation and entropy positions run on it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=64",
    "rlp.contexts_per_step=4", "rlp.group_size=2", "rlp.max_thought_tokens=4",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32", "train.seed=7",
    "data.ntp_seq_length=32", "data.ntp_batch_size=4", "device.num_threads=2",
)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed")
    proc = run("tools/preprocess_data.py", "--input", "data/corpus.jsonl", "--output-prefix",
               str(out / "corpus"), "--workers", "2")
    assert "2,000 documents" in proc.stdout and "tok/s" in proc.stderr
    small = out / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"note {i}: " + "the cat sat. " * 8}) + "\n"
                             for i in range(50)))
    run("tools/preprocess_data.py", "--input", str(small), "--output-prefix",
        str(out / "small"), "--workers", "1", "--quiet")
    return out


def test_rlp_and_ntp_train_on_indexed_data(datasets, tmp_path):
    metrics = tmp_path / "m.jsonl"
    blend = f"data.blend=0.8 {datasets / 'corpus'} 0.2 {datasets / 'small'}"
    run("pretrain_rlp.py", "--config", "examples/configs/tiny_cpu.yaml", *TINY, blend,
        "data.split=95,5,0", "rlp.positions_per_document=2", "rlp.position_strategy=stride",
        "rlp.position_stride=4", "train.steps=2", f"train.metrics_file={metrics}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    ntp = run("pretrain_rlp.py", "--config", "examples/configs/tiny_cpu.yaml", *TINY,
              f"data.corpus={datasets / 'corpus'}", "train.objective=ntp", "train.steps=2",
              f"train.save={tmp_path / 'ntp'}")
    assert (tmp_path / "ntp" / "latest").is_file(), ntp.stdout


def test_validation_and_entropy_positions(datasets):
    from megatron_rlp import distributed
    from megatron_rlp.config import load_config
    from megatron_rlp.data import IndexedCorpus
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer
    from megatron_rlp.train.validate import validate

    cfg = load_config("examples/configs/tiny_cpu.yaml", TINY + (
        f"data.corpus={datasets / 'corpus'}", "data.split=90,10,0", "train.eval_interval=1",
        "train.eval_contexts=4", "rlp.position_strategy=entropy",
        "rlp.positions_per_document=2"), world_size=1)
    distributed.initialize(cfg)
    try:
        state = build_state(cfg)
        assert isinstance(state.corpus, IndexedCorpus) and len(state.valid_corpus) == 200
        before = validate(state)
        assert before == validate(state)  # same contexts, same thought keys, same weights
        assert before["val_nll_teacher"] == before["val_nll_policy"]  # teacher not yet built
        for key in ("val_nll_teacher", "val_nll_think", "val_info_gain"):
            assert math.isfinite(before[key]), key
        assert before["val_info_gain"] == pytest.approx(
            before["val_nll_teacher"] - before["val_nll_think"], abs=1e-5)

        sampler = make_context_sampler(state)
        contexts = sampler.sample(1, 4, 2)
        assert len(contexts) == 4 and len({c.doc_index for c in contexts}) == 2
        metrics = rlp_step(state, sampler, PhaseTimer())
        assert metrics["skipped"] == 0.0
        after = validate(state)
        assert after["val_nll_policy"] != before["val_nll_policy"]  # the policy moved
    finally:
        distributed.shutdown()
