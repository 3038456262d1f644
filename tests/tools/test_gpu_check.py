"""tools/gpu_check.sh and its driver without a GPU: the roofline/MFU arithmetic by hand, the
step-1 comparison, the offline-install refusals, and the whole path tiny on CPU
(`--device cpu --dry-run`: the same subprocesses, configs and JSON as on the H200).

Untested here: the CUDA runs themselves and the wheel install into a venv that sees a
system torch (checked by hand: the three wheels install with --no-index --no-deps and
megatron.core imports from the venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rlp.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

SCRIPT = "tools/gpu_check.sh"


def test_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run([sc, "-x", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_model_shape_is_qwen3_1p7b():
    cfg = load_config(str(ROOT / "examples/configs/qwen3_1p7b.yaml"), (
        "data.tokenizer=byte", "device.type=cuda"))
    shape = gpu_check.model_shape(cfg, 151936)
    # 28 x (attention 2048 x 128 x (2 x 16 + 2 x 8) + SwiGLU 3 x 2048 x 6144) + tied output
    assert shape["layer_matmul_params"] == 28 * (2048 * 128 * 48 + 3 * 2048 * 6144)
    assert shape["output_params"] == 151936 * 2048
    total = shape["layer_matmul_params"] + shape["output_params"]
    assert abs(total - 1.72e9) < 0.01e9  # the model card's 1.72B (norms are ~0.1M)
    assert shape["kv_bytes_per_token_bf16"] == 28 * 2 * 8 * 128 * 2  # 112 KiB per token


def test_model_shape_counts_mamba_layers():
    cfg = load_config(str(ROOT / "examples/configs/tiny_hybrid_cpu.yaml"))
    shape = gpu_check.model_shape(cfg, 320)
    d, ffn, d_inner, groups, state, heads = 256, 1024, 512, 2, 32, 16
    mamba = d * (2 * d_inner + 2 * groups * state + heads) + d_inner * d
    attn = d * 64 * (2 * 4 + 2 * 2)
    assert shape["layer_matmul_params"] == 3 * mamba + attn + 3 * 2 * d * ffn  # M-M*-M-
    assert shape["attention_layers"] == 1


def test_roofline_by_hand():
    shape = {"layer_matmul_params": 1e9, "output_params": 0.5e9, "attention_layers": 10,
             "attention_width": 1000, "kv_bytes_per_token_bf16": 1e5}
    rows, prefix, thought = 100, 99, 100  # mean context 99 + 1 + 50 = 150 tokens
    r = gpu_check.roofline(shape, rows, prefix, thought, decode_s=10.0, update_s=2.0,
                           update_tokens=20_000, hbm_tbps=4.0, peak_tflops=500.0)
    step_bytes = 2 * 1.5e9 + 100 * 150 * 1e5  # 3 GB weights + 1.5 GB K/V
    step_flops = 2 * 100 * (1.5e9 + 2 * 10 * 1000 * 150)
    assert step_bytes / 4e12 > step_flops / 500e12  # HBM-bound, as decode should be
    assert r["decode_bound"] == "hbm"
    assert r["decode_roofline_tokens_per_s"] == pytest.approx(100 / (step_bytes / 4e12))
    assert r["decode_tokens_per_s"] == pytest.approx(100 * 100 / 10.0)
    assert r["decode_fraction_of_roofline"] == pytest.approx(1000 / (100 / (step_bytes / 4e12)))
    forward = 2 * 1e9 * 20_000 + 2 * 0.5e9 * 10_000 + 2 * 10 * 1000 * 200**2 * 100
    assert r["update_tokens_per_s"] == pytest.approx(10_000)
    assert r["update_mfu"] == pytest.approx(3 * forward / 2.0 / 500e12)


def test_compare_step1_metrics():
    a = {"s_ema": -5.0, "s_pred": -4.9, "reward_mean": 0.1}
    b = {"s_ema": -5.05, "s_pred": -4.9, "reward_mean": 0.15}
    ok = gpu_check.compare(a, b, 0.1)
    assert ok["ok"] and ok["abs_diff"]["reward_mean"] == pytest.approx(0.05)
    assert not gpu_check.compare(a, b, 0.01)["ok"]
    assert not gpu_check.compare(a, None, 0.1)["ok"]


def _fake_python(tmp_path: Path, without: str) -> Path:
    """A python that works except that `-c` snippets importing `without` fail (a machine
    lacking that package)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ] && [[ "$2" == *"{without}"* ]]; '
                    f'then exit 1; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("without, message", [
    ("megatron", "pip download megatron-core==0.19.2 einops psutil --no-deps"),
    ("torch", "torch does not import"),
    ("version_info", "not a Python >= 3.12"),
])
def test_script_names_what_is_missing(tmp_path, without, message):
    env = {**os.environ, "PYTHON": str(_fake_python(tmp_path, without)),
           "WHEELS": str(tmp_path / "no_wheels"), "OUT": str(tmp_path / "out"),
           "GPU_CHECK_VENV": str(tmp_path / "venv")}
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "venv").exists()


def _dry_run(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", SCRIPT, "--device", "cpu", "--dry-run", "--dtype", "fp32",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[gpu_check]" in proc.stdout
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def _check_report(report: dict, tiny: list[str]) -> None:
    assert report["ok"] and report["within_budget"]
    assert set(report["stages"]) == {f"tiny_{n}" for n in tiny} | {"qwen3_shape",
                                                                    "packed_attention", "te"}
    assert report["stages"]["te"]["skipped"]  # no TE, no CUDA here
    pa = report["stages"]["packed_attention"]  # eager flex on CPU: plumbing, not speed
    assert 0 < pa["sparsity"]["block"] < 1 and pa["seconds"]["flex"] > 0
    assert pa["loss_abs_diff"] < 1e-5 and pa["grad_max_abs_diff"] < 1e-5
    for name in tiny:
        stage = report["stages"][f"tiny_{name}"]
        assert stage["device"]["steps"] == 2 and stage["device"]["rc"] == 0
        check = stage["step1_vs_cpu_fp32"]
        # Same device and dtype in the dry run: the two runs must agree to the last bit.
        assert check["ok"] and all(d == 0.0 for d in check["abs_diff"].values()), check
    q = report["stages"]["qwen3_shape"]
    assert q["rows"] == 4 * 2 and 0 < q["mean_thought_tokens"] <= 8
    # 4 positions per document: a context reads its document's window up to it, at most
    # max_prefix + band - 1 = 32 + 17 - 1 tokens ("Full prefixes"), at least min_prefix
    assert 16 <= q["mean_prefix_tokens"] <= 48
    for key in ("decode_tokens_per_s", "decode_roofline_tokens_per_s", "update_tokens_per_s",
                "update_mfu", "peak_memory_gib"):
        assert q[key] > 0, key
    assert q["memory_kind"] == "cpu peak RSS"


def test_dry_run_qwen3_shape(tmp_path):
    """The Qwen3-shaped stage alone (one subprocess): bench child, roofline, JSON."""
    _check_report(_dry_run(tmp_path, "--skip", "tiny"), [])


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    """Every stage: 2 tiny configs x (device run + CPU fp32 reference) + the Qwen3 shape
    (5 subprocesses; ~1 minute of CPU time)."""
    _check_report(_dry_run(tmp_path), ["dense", "hybrid"])
