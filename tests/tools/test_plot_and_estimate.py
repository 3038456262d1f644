"""tools/estimate_memory.py (parameter counts against the built Megatron model and the
published figures, cache arithmetic, CLI) and tools/plot_metrics.py (a real PNG), plus the
MetricsWriter's optional sinks (TensorBoard, W&B, progress/ETA)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/configs/tiny_cpu.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"rlp_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


em = _tool("estimate_memory")
plot_tool = _tool("plot_metrics")

# Published architectures (/work/shared/MODELS.md), as overrides of any config.
QWEN3_1P7B = ["model.hybrid_layer_pattern=" + "*-" * 28, "model.hidden_size=2048",
              "model.ffn_hidden_size=6144", "model.num_attention_heads=16",
              "model.num_query_groups=8", "model.kv_channels=128", "model.qk_layernorm=true",
              "model.activation=swiglu"]
NEMOTRON_H_8B = [
    "model.hybrid_layer_pattern=M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "model.hidden_size=4096", "model.ffn_hidden_size=21504", "model.activation=squared_relu",
    "model.num_attention_heads=32", "model.num_query_groups=8", "model.kv_channels=128",
    "model.qk_layernorm=false", "model.untie_embeddings_and_output_weights=true",
    "model.mamba_num_heads=128", "model.mamba_head_dim=64", "model.mamba_state_dim=128",
    "model.mamba_num_groups=8"]
NEMOTRON_NANO_12B = [
    "model.hybrid_layer_pattern=M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    "model.hidden_size=5120", "model.ffn_hidden_size=20480", "model.activation=squared_relu",
    "model.num_attention_heads=40", "model.num_query_groups=8", "model.kv_channels=128",
    "model.qk_layernorm=false", "model.untie_embeddings_and_output_weights=true",
    "model.mamba_num_heads=128", "model.mamba_head_dim=80", "model.mamba_state_dim=128",
    "model.mamba_num_groups=8"]


def _cfg(overrides, world_size=1):
    return em._load(str(TINY), list(overrides), world_size, validate=False)


@pytest.mark.parametrize("overrides, vocab, published", [
    (QWEN3_1P7B, 151936, 1_720_574_976),
    (NEMOTRON_H_8B, 131072, 8_100_852_736),
    (NEMOTRON_NANO_12B, 131072, 12_310_001_152),
])
def test_parameter_count_matches_published_models(overrides, vocab, published):
    cfg = _cfg(overrides)
    assert em.parameter_counts(em.shapes(cfg, vocab), 1)["total"] == published


@pytest.mark.parametrize("config", ["tiny_cpu.yaml", "tiny_hybrid_cpu.yaml", "tiny_moe_cpu.yaml",
                                    "tiny_hybrid_moe_cpu.yaml"])
def test_parameter_count_matches_the_built_megatron_model(config):
    """The same formula against HybridModel as the provider builds it (attention, MLP,
    Mamba-2 and MoE layers: router, routed and shared experts), on one CPU rank."""
    path = ROOT / "examples/configs" / config
    assert path.is_file(), f"{config} is missing"
    from megatron_rlp import distributed
    from megatron_rlp.config import load_config
    from megatron_rlp.models.provider import build_model
    from megatron_rlp.tokenizer import build_tokenizer

    cfg = load_config(str(path))
    vocab = build_tokenizer(cfg.data.tokenizer).vocab_size
    saved = dict(os.environ)  # initialize() sets RANK/MASTER_PORT/... for a 1-process group
    distributed.initialize(cfg)
    try:
        built = sum(p.numel() for p in build_model(cfg, vocab).parameters())
    finally:
        distributed.shutdown()
        os.environ.clear()
        os.environ.update(saved)
    assert em.parameter_counts(em.shapes(cfg, vocab), 1)["total"] == built


def test_rollout_cache_arithmetic_and_tp_invariance():
    base = QWEN3_1P7B + ["device.type=cuda", "precision.params_dtype=bf16",
                         "rlp.contexts_per_step=512", "rlp.group_size=4",
                         "rlp.max_prefix_tokens=2048", "rlp.max_thought_tokens=2048",
                         "model.max_sequence_length=4160"]
    # With shared prefixes (the default) the rollout decodes with cascade attention: each
    # context's prefix (window + <think>) once, each row its thought (+ </think>)
    cascade = em.estimate(_cfg(base, 32), 32, 151936)
    contexts, rows = 512 // 32, 512 // 32 * 4
    assert cascade["phases"]["rollout"]["kv_cache"] == (
        28 * 2 * (contexts * 2049 + rows * 2049) * 8 * 128 * 2)
    # The per-context path (and the checks below): every row holds prefix + thought
    base = base + ["rlp.share_prefixes=false"]
    one = em.estimate(_cfg(base, 32), 32, 151936)
    seq = 2048 + 2048 + 2
    assert one["batch"]["rollout_rows_per_rank"] == rows
    # K and V, 28 attention layers, 8 KV heads x 128, bf16
    assert one["phases"]["rollout"]["kv_cache"] == 28 * 2 * rows * seq * 8 * 128 * 2
    # 8 positions per document: a prefix can span its document's whole window, up to
    # 2048 + (2048 - 128) tokens (data/contexts.py)
    eight = em.estimate(_cfg(base + ["rlp.positions_per_document=8",
                                     "rlp.min_prefix_tokens=128"], 32), 32, 151936)
    assert eight["phases"]["rollout"]["kv_cache"] == 28 * 2 * rows * (seq + 1920) * 8 * 128 * 2
    two = em.estimate(_cfg(base + ["parallel.tensor_model_parallel_size=2"], 32), 32, 151936)
    # TP=2 halves the heads per rank but doubles the rows per rank (DP halves)
    assert two["phases"]["rollout"]["kv_cache"] == one["phases"]["rollout"]["kv_cache"]
    assert two["persistent"]["ema_teacher"] < 0.51 * one["persistent"]["ema_teacher"]
    # rollouts in chunks of 4 of the rank's 16 contexts: the cache holds a quarter of the rows
    chunked = em.estimate(_cfg(base + ["rlp.rollout_chunk_contexts=4"], 32), 32, 151936)
    assert chunked["phases"]["rollout"]["kv_cache"] == one["phases"]["rollout"]["kv_cache"] / 4
    assert chunked["layout"]["rollout_chunks"] == 4
    # recomputation: selective drops the attention scores (the explicit-mask update keeps
    # them; FlexAttention's fused kernel keeps none), full keeps little but layer inputs
    acts = {g: em.estimate(_cfg(base + ["train.micro_batch_size=1", "model.packed_attention=mask",
                                        f"train.recompute_granularity={g}"], 32), 32, 151936)
            ["phases"]["update"]["activations"] for g in ("none", "selective", "full")}
    assert acts["full"] < 0.1 * acts["none"] and acts["full"] < acts["selective"] < acts["none"]
    flex = em.estimate(_cfg(base + ["train.micro_batch_size=1"], 32), 32, 151936)
    assert flex["layout"]["update_attention"] == "flash"  # cuda, attention-only: flex
    assert flex["phases"]["update"]["activations"] == pytest.approx(acts["selective"])
    # bf16 + Adam: 2 (params) + 4 (grads) + 4 (EMA) bytes, 12 for the optimizer (no dist-opt)
    n = one["parameters"]["per_rank"]
    assert one["persistent"]["parameters"] == 2 * n and one["persistent"]["optimizer"] == 12 * n


def test_mamba_state_is_counted():
    cfg = _cfg(NEMOTRON_H_8B + ["rlp.contexts_per_step=8", "rlp.group_size=2"], 1)
    est = em.estimate(cfg, 1, 131072)
    rows = 16
    ssm = 24 * rows * 128 * 64 * 128 * 4  # fp32 decode state whatever the params dtype
    conv = 24 * rows * (8192 + 2 * 8 * 128) * 3 * 4
    assert est["phases"]["rollout"]["ssm_conv_state"] == ssm + conv
    bf16 = em.estimate(_cfg(NEMOTRON_H_8B + ["rlp.contexts_per_step=8", "rlp.group_size=2",
                                             "precision.params_dtype=bf16"], 1), 1, 131072)
    assert bf16["phases"]["rollout"]["ssm_conv_state"] == ssm + conv
    # The teacher's logits: the scored positions of each window only, not whole windows.
    docs = 8 // cfg.rlp.positions_per_document
    assert est["phases"]["scoring"]["logits"] == docs * cfg.rlp.positions_per_document * 131072 * 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/estimate_memory.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_estimate_cli_table_and_json():
    proc = _cli("--config", str(TINY), "--world-size", "2")
    assert proc.returncode == 0, proc.stderr
    for item in ("parameters", "EMA teacher (fp32)", "kv cache", "rollout phase",
                 "update phase", "peak"):
        assert item in proc.stdout, proc.stdout
    proc = _cli("--config", str(TINY), "--world-size", "2", "--json", "rlp.group_size=8")
    data = json.loads(proc.stdout)
    assert data["layout"]["dp"] == 2 and data["batch"]["rollout_rows_per_rank"] == 4 * 8
    assert data["fits"] is True and data["total"] > sum(data["persistent"].values())


def test_estimate_cli_errors_are_one_line():
    proc = _cli("--config", str(TINY), "--world-size", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------------------
# plots


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def _write_metrics(path: Path, steps: int, objective: str = "rlp") -> None:
    with path.open("w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "objective": objective, "loss": 0.01 / s,
                                "reward_mean": -1 + s / steps, "reward_std": 0.5,
                                "clip_fraction": 0.01 * (s % 3), "thought_len": 10 + s % 7,
                                "s_ema": -3.0, "s_pred": -4 + s / steps,
                                "tokens_per_s": 1000.0 + s}) + "\n")


def test_plot_writes_png_with_all_panels(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install '.[plot]')")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_metrics(a, 40)
    _write_metrics(b, 25)
    b.write_text(b.read_text() + "not json\n")  # tolerated, with a warning
    out = tmp_path / "plots" / "m.png"
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(a), str(b), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "is not JSON" in proc.stderr
    assert _png_size(out) == (1500, 850) and out.stat().st_size > 30_000


def test_plot_rejects_missing_and_empty_files(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install '.[plot]')")
    assert plot_tool.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.png")]) == 2
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no metrics"):
        plot_tool.plot([empty], tmp_path / "x.png")


def test_plot_keeps_the_last_write_of_a_resumed_step(tmp_path):
    f = tmp_path / "m.jsonl"
    rows = [{"step": 1, "objective": "rlp", "loss": 1.0}, {"step": 2, "objective": "rlp",
            "loss": 2.0}, {"step": 2, "objective": "rlp", "loss": 3.0}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = plot_tool.read_series(f)
    assert [r["loss"] for r in series["rlp"]] == [1.0, 3.0]
    assert plot_tool.ema([1.0, float("nan"), 3.0], 3)[1] == 1.0


# --------------------------------------------------------------------------------------
# MetricsWriter sinks


def _writer(tmp_path, **kw):
    from megatron_rlp.train.metrics import MetricsWriter

    return MetricsWriter(str(tmp_path / "m.jsonl"), "rlp", **kw)


def test_console_lines_keep_their_prefix_and_gain_an_eta(tmp_path, capsys):
    w = _writer(tmp_path, total_steps=10)
    w.log(1, {"loss": 0.5, "reward_mean": -1.0, "t_rollout": 0.2})
    w.log(2, {"loss": 0.4, "reward_mean": -0.5, "t_rollout": 0.2}, console=False)
    w.log(3, {"loss": 0.3, "reward_mean": -0.2, "t_rollout": 0.2})
    w.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("[rlp step ") for line in lines)
    assert lines[0].startswith("[rlp step     1] loss +0.5000 | reward -1.0000 | rollout 0.20s")
    assert lines[1].endswith("| 3/10 eta 0:00:00")
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_held_out_metrics_and_peak_memory_reach_the_console(tmp_path, capsys):
    """Validation metrics get their own console line at the step they are computed, even
    off the log interval; step lines show the model TFLOP/s per GPU and the peak memory,
    which the JSON rows do not hold (resumed runs must write the same rows)."""
    w = _writer(tmp_path)
    w.log(1, {"loss": 0.5, "flops": 3e12, "step_time": 2.0})
    w.log(2, {"loss": 0.4, "val_nll_teacher": 2.5, "val_info_gain": 0.01,
              "val_contexts": 8.0}, console=False)
    w.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and re.search(r"\| peak_mem \d+\.\d\d GiB$", lines[0]), lines
    assert "| TFLOP/s/GPU 1.5 |" in lines[0], lines[0]
    assert lines[1] == "[rlp valid step     2] nll_teacher 2.5000 | info_gain +0.0100"
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert not any("peak_mem" in k for r in rows for k in r)


def test_progress_bar_draws_on_a_terminal_only():
    from megatron_rlp.train.metrics import Progress, format_duration

    assert format_duration(3725) == "1:02:05"
    stream = io.StringIO()
    p = Progress(4, stream=stream, bar=True)
    p.update(1)
    p.draw("rlp")
    p.update(2)
    p.draw("rlp")
    assert "\r[rlp] [############------------]  50% 2/4 eta" in stream.getvalue()
    p.clear()
    assert stream.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()
    q = Progress(4, stream=quiet)  # StringIO is not a TTY: no bar
    q.update(1)
    q.draw("rlp")
    assert quiet.getvalue() == ""


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install "
                        "'.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = _writer(tmp_path, tensorboard_dir=str(tmp_path / "tb"))
    for step in (1, 2, 3):
        w.log(step, {"reward_mean": 0.1 * step, "loss": float("nan"), "clip_fraction": 0.0})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"rlp/reward_mean", "rlp/clip_fraction"} <= set(acc.Tags()["scalars"])
    assert "rlp/loss" not in acc.Tags()["scalars"]  # non-finite values are not logged
    assert [e.step for e in acc.Scalars("rlp/reward_mean")] == [1, 2, 3]
    assert acc.Scalars("rlp/reward_mean")[-1].value == pytest.approx(0.3)


def test_missing_optional_packages_are_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    w = _writer(tmp_path, tensorboard_dir=str(tmp_path / "tb"), wandb_project="rlp")
    w.log(1, {"loss": 1.0})
    w.close()
    err = capsys.readouterr().err
    assert "tensorboard package is not installed" in err and "wandb is not installed" in err


def test_wandb_offline_run(tmp_path, monkeypatch):
    """With a stand-in `wandb` module: the writer's calls (real wandb: same API, and
    WANDB_MODE=offline needs no network)."""
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    w = _writer(tmp_path, wandb_project="rlp-test", wandb_config={"rlp": {"group_size": 4}})
    w.log(5, {"reward_mean": 0.25, "loss": 1.0})
    w.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "rlp-test"
    assert calls[0][1]["config"] == {"rlp": {"group_size": 4}}
    assert calls[1] == ("log", 5, {"rlp/reward_mean": 0.25, "rlp/loss": 1.0})
    assert calls[-1] == ("finish",)


def test_real_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (optional: pip install '.[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = _writer(tmp_path, wandb_project="rlp-test")
    assert w.wandb is not None
    w.log(1, {"reward_mean": 0.5})
    w.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_from_config_reads_the_train_section(tmp_path):
    from megatron_rlp.config import load_config
    from megatron_rlp.train.metrics import MetricsWriter

    cfg = load_config(str(TINY), (f"train.metrics_file={tmp_path / 'x.jsonl'}",
                                  "train.steps=7", "train.progress=false"))
    w = MetricsWriter.from_config(cfg)
    assert w.progress is None and w.tb is None and w.wandb is None and w.file is not None
    w.close()


def test_moe_experts_split_over_expert_parallel_ranks():
    """EP splits only the routed experts (and TP splits them too, as Megatron's expert TP);
    the distributed optimizer shards their Adam state over DP / EP ranks."""
    moe = str(ROOT / "examples/configs/tiny_moe_cpu.yaml")
    cfg = em._load(moe, [], 8, validate=False)
    one = em.parameter_counts(em.shapes(cfg, 260), 1, 1)
    four = em.parameter_counts(em.shapes(cfg, 260), 1, 4)
    assert four["experts_per_rank"] == one["experts_per_rank"] / 4 > 0
    assert one["per_rank"] - four["per_rank"] == one["experts_per_rank"] * 3 / 4
    assert one["active"] < one["total"]
    dist = ["parallel.use_distributed_optimizer=true", "parallel.expert_model_parallel_size=4"]
    est = em.estimate(em._load(moe, dist, 8, validate=False), 8, 260)
    n, e = est["parameters"]["per_rank"], four["experts_per_rank"]
    assert est["persistent"]["optimizer"] == pytest.approx((n - e) * 8 / 8 + e * 8 / 2)




@pytest.mark.parametrize(("chunk", "windows"), [(0, 2), (8, 1), (4, 1), (3, 2), (10, 2)])
def test_shared_prefix_rollout_prefills_each_document_window_once(chunk, windows):
    """With rlp.share_prefixes the rollout prefills each document's window once
    (packing/prefill.py), positions_per_document contexts a window: the prefill transient
    has a row per window a chunk touches (16 contexts a rank, 8 a document; a chunk of 3 or
    10 can straddle two), not one per context (the simulated Qwen3 rollout, docs/simulated/,
    holds 0.7 GiB beside its cache where per-context prefills gave 7.2)."""
    from megatron_rlp.train import memory

    base = QWEN3_1P7B + ["device.type=cuda", "precision.params_dtype=bf16",
                         "rlp.contexts_per_step=512", "rlp.group_size=1",
                         "rlp.positions_per_document=8", "rlp.max_prefix_tokens=2048",
                         "rlp.max_thought_tokens=64", "model.max_sequence_length=4160",
                         f"rlp.rollout_chunk_contexts={chunk}"]
    shared = memory.estimate(_cfg(base + ["rlp.share_prefixes=true"], 32), 32, 151936)
    alone = memory.estimate(_cfg(base + ["rlp.share_prefixes=false"], 32), 32, 151936)
    cfg = _cfg(base, 32)
    s = memory.shapes(cfg, 151936)
    window = cfg.rlp.max_window_tokens() + 1
    assert shared["phases"]["rollout"]["transient"] == memory.one_layer_inference_bytes(
        s, 1, 2, windows, window, "unfused")
    assert alone["phases"]["rollout"]["transient"] == memory.one_layer_inference_bytes(
        s, 1, 2, chunk or 16, window, "unfused")


@pytest.mark.parametrize("flag, value, allowed", [
    ("--overhead-gib", "-100", "(allowed: >= 0)"), ("--vocab-size", "-5", "(allowed: >= 1)"),
    ("--gpu-gib", "0", "(allowed: > 0)"), ("--world-size", "x", "(allowed: int)")])
def test_estimate_cli_refuses_out_of_range_numbers(flag, value, allowed):
    """A negative overhead printed a negative peak that "fits"; each bound is named."""
    with pytest.raises(SystemExit) as e:
        em.main(["--config", str(TINY), flag, value])
    assert e.value.code == 2


def test_pipeline_first_stage_counts_1f1b_micro_batches_in_flight():
    """Megatron's 1F1B keeps min(PP, micro-batches) update micro-batches in flight on stage 0:
    the update's activations at PP=2 are twice one micro-batch's (per stage's layers)."""
    from megatron_rlp.config import load_config

    one = load_config(TINY, ("model.hybrid_layer_pattern=*-*-", "train.micro_batch_size=1"),
                      world_size=1)
    two = load_config(TINY, ("model.hybrid_layer_pattern=*-|*-", "train.micro_batch_size=1",
                             "parallel.pipeline_model_parallel_size=2"), world_size=2)
    a, b = em.estimate(one, 1, 256), em.estimate(two, 2, 256)  # DP=1 both: same micro-batches
    assert a["batch"]["update_micro_batches"] == b["batch"]["update_micro_batches"] > 2
    assert a["batch"]["update_micro_batches_in_flight"] == 1
    assert b["batch"]["update_micro_batches_in_flight"] == 2
    # a stage holds half the layers, and two micro-batches of them
    assert b["phases"]["update"]["activations"] == pytest.approx(
        2 * a["phases"]["update"]["activations"] / 2)
