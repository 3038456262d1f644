"""tools/bench_rlp.py: naive and shared-prefix paths (and the transformers yardstick) run on
the same contexts in one process, agree on thoughts, rewards and loss, and the JSON holds
phases, memory, FLOP model and speed-ups (no speed is asserted: that is the benchmark's job)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2",
         "rlp.contexts_per_step=4", "rlp.positions_per_document=2", "rlp.group_size=2",
         "rlp.max_thought_tokens=4", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=48",
         "model.max_sequence_length=96", "device.num_threads=1"]  # windows <= 48 + 40 tokens


def test_bench_rlp_compares_paths_on_the_same_contexts(tmp_path):
    out = tmp_path / "paths.json"
    proc = subprocess.run([sys.executable, "tools/bench_rlp.py", "--steps", "1", "--warmup", "1",
                           "--hf", "--block-size", "16", "--out", str(out), *SMALL], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"naive", "optimised", "hf"}
    assert len(res["checks"]) == 2 and res["equal"]["identical_thoughts_all_steps"]
    assert res["equal"]["max_reward_abs_diff"] < 1e-4
    assert res["equal"]["max_loss_abs_diff"] < 1e-5
    for row in res["paths"]["optimised"]["per_step"]:  # what the contexts read
        assert 8 <= row["prefix_len"] <= row["window_len"] <= 88
    for name, path in res["paths"].items():
        assert set(path["phases_s"]) == {"step", "rollout", "scoring", "update"}
        assert path["tokens_per_s"] > 0 and 0 < path["peak_memory_bytes"] < 8 * 2**30
        if name != "hf":
            flops = path["flop_model"]
            assert flops["step"] == sum(flops[k] for k in ("prefill", "decode", "scoring",
                                                           "update")) > 0
            assert path["achieved_flop_per_s"] > 0 and path["update_flop_per_s"] > 0
            assert path["rollout_cache_bytes"] > 0  # after the fork (cascade: C*P + R*T)
        assert path["decode_ms_per_step"]["median"] > 0
        assert path["decoded_tokens_per_s"]["median"] > 0
    # The FLOP model counts the step's necessary work: the same for both paths.
    assert res["paths"]["naive"]["flop_model"] == res["paths"]["optimised"]["flop_model"]
    assert set(res["speedup"]) == {"optimised_vs_naive", "optimised_vs_hf", "naive_vs_hf",
                                   "rollout_optimised_vs_hf"}
    assert res["matmul_flop_per_s"] > 0
    # The packed update's block sparsity (FlexAttention tiles skipped); no CUDA: not timed.
    sparsity = res["packed_attention"]["sparsity"]
    assert sparsity["block_size"] == 16 and 0 < sparsity["block"] <= sparsity["pair"] < 1
    assert "seconds" not in res["packed_attention"]


def test_peak_memory_sees_a_block_allocation():
    """bench_rlp's CPU peak (glibc mallinfo2, sampled) sees a 64 MiB tensor held in the block
    and freed before its end, and not one freed before the block began."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_rlp", ROOT / "tools" / "bench_rlp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with bench.PeakMemory() as held:
        x = torch.ones(16 * 2**20)  # 64 MiB, float32
        time.sleep(0.05)
        del x
    assert held.bytes >= 64 * 2**20, held.bytes
    with bench.PeakMemory() as idle:
        time.sleep(0.02)
    assert idle.bytes < 16 * 2**20, idle.bytes


def test_bench_rlp_runs_attention_variants_without_naive(tmp_path):
    """--skip-naive --also-attention mask: the optimised path with the split attention (the CPU
    default) and with the dense tree mask, side by side, checked against each other."""
    out = tmp_path / "variants.json"
    proc = subprocess.run([sys.executable, "tools/bench_rlp.py", "--steps", "1", "--warmup", "0",
                           "--skip-naive", "--also-attention", "mask", "--out", str(out), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"optimised", "optimised_mask"}
    assert res["run"]["config"]["model"]["packed_attention"] == "auto"  # split on CPU
    assert [(c["path"], c["against"]) for c in res["checks"]] == [("optimised_mask",
                                                                    "optimised")]
    assert res["equal"]["identical_thoughts_all_steps"]
    assert res["equal"]["max_loss_abs_diff"] < 1e-5
    assert set(res["speedup"]) == set(res["speedup_cpu"]) == {"optimised_vs_optimised_mask"}
    for path in res["paths"].values():  # CPU seconds of the thread beside the wall seconds
        cpu = {k: v["median"] for k, v in path["phases_cpu_s"].items()}
        assert 0 < cpu["update"] < cpu["step"] and cpu["rollout"] > 0
        assert 0 < path["update_vs_matmul"] == path["update_flop_per_s"] / res[
            "matmul_flop_per_s"]


def test_bench_rlp_speed_path_beside_the_defaults(tmp_path):
    """--speed: the optimised path with a user's speed settings on top (here the teacher
    scored only at logged steps), side by side with the defaults: same thoughts and
    advantages, rewards without S_ema on the unscored steps, warm-up steps reported apart."""
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "tools/bench_rlp.py", "--steps", "2", "--warmup", "1",
                           "--skip-naive", "--speed", "rlp.teacher_scoring=log_interval",
                           "--speed", "train.log_interval=10", "--out", str(out), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"optimised", "speed"}
    assert res["run"]["speed"] == ["rlp.teacher_scoring=log_interval", "train.log_interval=10"]
    assert [(c["path"], c["against"]) for c in res["checks"]] == [("speed", "optimised")] * 3
    assert res["equal"]["identical_thoughts_all_steps"]
    assert res["equal"]["max_advantage_abs_diff"] < 1e-5
    assert res["equal"]["max_loss_abs_diff"] < 1e-5
    # step 1 (warm-up) scores the teacher, steps 2-3 do not: their rewards are S_pred alone
    rewards = [c["rewards_max_abs_diff"] for c in res["checks"]]
    assert rewards[0] < 1e-5 < min(rewards[1:])
    speed, plain = res["paths"]["speed"], res["paths"]["optimised"]
    assert [r["teacher_scored"] for r in speed["per_step"]] == [0.0, 0.0]
    assert [r["teacher_scored"] for r in plain["per_step"]] == [1.0, 1.0]
    for path in (speed, plain):
        assert len(path["warmup_steps"]) == 1 and path["warmup_steps"][0]["step_cpu"] > 0
        assert path["decode_compiles"] == 0  # rlp.compile_decode off
    assert speed["phases_cpu_s"]["scoring"]["median"] < plain["phases_cpu_s"]["scoring"]["median"]
    assert any(line.startswith("[bench_rlp] speed ") and "warm-up (untimed)" in line
               for line in proc.stdout.splitlines())


def test_bench_rlp_models_side_by_side_at_equal_active_parameters(tmp_path):
    """`--models`: the tiny dense, MoE, hybrid and hybrid-MoE configs each run RLP steps in one
    process; the MoE models' active parameters equal their dense counterparts' but for the
    routers (hidden x experts per MoE layer), and routing agreement is 1.0."""
    out = tmp_path / "models.json"
    small = ["rlp.contexts_per_step=4", "rlp.positions_per_document=2", "rlp.group_size=2",
             "rlp.max_thought_tokens=4", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=48",
             "model.max_sequence_length=96", "device.num_threads=1"]
    proc = subprocess.run([sys.executable, "tools/bench_rlp.py", "--models", "--steps", "1",
                           "--warmup", "0", "--out", str(out), *small], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["dense", "moe", "hybrid", "hybrid-moe"]
    for moe, dense in (("moe", "dense"), ("hybrid-moe", "hybrid")):
        pattern = models[moe]["pattern"]
        assert pattern.replace("E", "-") == models[dense]["pattern"]
        routers = pattern.count("E") * 256 * 8  # hidden x experts, per MoE layer
        p, q = models[moe]["parameters"], models[dense]["parameters"]
        assert p["active"] - routers == q["active"] == q["total"] < p["total"]
        assert p["total"] - p["active"] == p["routed_experts"] * 6 // 8  # 6 of 8 experts idle
        assert models[moe]["per_step"][0]["routing_agreement"] == 1.0
    for m in models.values():
        assert set(m["phases_s"]) == {"step", "rollout", "scoring", "update"}
        assert m["phases_s"]["step"]["median"] > 0 and m["tokens_per_s"] > 0
    assert models["dense"]["step_vs_dense"] == models["dense"]["step_vs_dense_min"] == 1.0
