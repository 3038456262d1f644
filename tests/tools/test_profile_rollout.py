"""tools/profile_rollout.py: a rollout's wall time split by region adds up, and the profiled
split gives operator and Python time for the decode step's Megatron module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2",
         "rlp.contexts_per_step=4", "rlp.positions_per_document=2", "rlp.group_size=2",
         "rlp.max_thought_tokens=4", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=48",
         "model.max_sequence_length=96", "device.num_threads=1"]


def test_profile_rollout_splits_the_decode_step(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "tools/profile_rollout.py", "--size", "config",
                           "--steps", "1", "--warmup", "0", "--out", str(out), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    t = res["wall_s_per_rollout"]
    parts = ("prefill", "fork", "decode_step", "sampling", "s_pred", "compaction", "loop")
    assert abs(sum(t[k] for k in parts) - t["rollout"]) < 1e-9 and t["loop"] >= 0
    c = res["cpu_s_per_rollout"]  # the thread's CPU seconds, split the same way
    assert abs(sum(c[k] for k in parts) - c["rollout"]) < 1e-9
    assert 0 < c["decode_step/module"] <= c["decode_step"]
    assert 0 < t["decode_step/module"] <= t["decode_step"]
    # one step per thought token, plus the forced `</think>` of the thoughts left open
    assert t["decode_steps_per_rollout"] == 5
    module = res["profiled_one_rollout_s"]["rollout/decode_step/module"]
    assert 0 < module["ops"] <= module["wall"] and module["top_ops"]
    assert res["rows"] == 4 * 2
