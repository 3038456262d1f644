"""tools/gpu_check.sh and its stages without a GPU.

Fast: the roofline/MFU arithmetic by hand; the comparisons against the shipped CPU fp32
references, with one planted wrong number at a time (an S_pred off by 1e-2, one thought token,
the grad norm, the parameters after the update, a skipped bf16 step, flex against mask) each
failing with one clear line; a stage that hangs is killed at its cap (with its children); the
launcher's refusals; the outputs packed into <= 3 files.
Slow: the fp32 stage on CPU against the shipped reference, planted and not; the whole
`--dry-run` through the launcher (wheels installed with --target, every stage on CPU).

Untested here: the CUDA runs themselves (docs/gpu/README.md: one call on the lent machine).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rlp.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import gpu_check_compare as cmp  # noqa: E402
import gpu_check_roofline as roof  # noqa: E402

SCRIPT = "tools/gpu_check.sh"
REF = ROOT / "docs/gpu/reference"


def _ref(name: str = "dense") -> dict:
    return json.loads((REF / f"tiny_{name}_fp32.json").read_text())


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
    shape = roof.model_shape(cfg, 151936)
    # 28 x (attention 2048 x 128 x (2 x 16 + 2 x 8) + SwiGLU 3 x 2048 x 6144) + tied output
    assert shape["layer_matmul_params"] == 28 * (2048 * 128 * 48 + 3 * 2048 * 6144)
    assert shape["output_params"] == 151936 * 2048
    total = shape["layer_matmul_params"] + shape["output_params"]
    assert abs(total - 1.72e9) < 0.01e9  # the model card's 1.72B (norms are ~0.1M)
    assert shape["kv_bytes_per_token_bf16"] == 28 * 2 * 8 * 128 * 2  # 112 KiB per token


def test_roofline_counts_computed_work_only():
    shape = {"layer_matmul_params": 1e9, "output_params": 0.5e9, "attention_layers": 10,
             "attention_width": 1000, "kv_bytes_per_token_bf16": 1e5}
    # 100 rows, mean prefix 99, 100 thought tokens each: mean decode context 99 + 1 + 50.
    # The packed update computed 12_000 tokens (windows once + branches), 3e6 (q, k) pairs.
    work = {"rows": 100, "mean_prefix_tokens": 99, "thought_tokens": 10_000,
            "tokens": 12_000, "attention_pairs": 3e6}
    r = roof.roofline(shape, work, decode_s=10.0, update_s=2.0, hbm_tbps=4.0, peak_tflops=500)
    step_bytes = 2 * 1.5e9 + 100 * 150 * 1e5  # 3 GB weights + 1.5 GB K/V
    step_flops = 2 * 100 * (1.5e9 + 2 * 10 * 1000 * 150)
    assert r["decode_bound"] == "hbm" and step_bytes / 4e12 > step_flops / 500e12
    assert r["decode_roofline_tokens_per_s"] == pytest.approx(100 / (step_bytes / 4e12))
    assert r["decode_tokens_per_s"] == pytest.approx(1000)
    forward = 2 * 1e9 * 12_000 + 2 * 0.5e9 * 10_000 + 4 * 10 * 1000 * 3e6
    assert r["update_tokens_per_s"] == pytest.approx(6000)
    assert r["update_mfu"] == pytest.approx(3 * forward / 2.0 / 500e12)


def test_reference_matches_itself_and_records_what_ran():
    for name in ("dense", "hybrid"):
        ref = _ref(name)
        assert cmp.compare_record(name, copy.deepcopy(ref), ref) == []
        assert ref["run"]["dtype"] == "fp32" and ref["run"]["device"] == "cpu"
        assert len(ref["record"]["s_pred"]) == 16 and len(ref["record"]["s_ema"]) == 4
    assert _ref("hybrid")["run"]["mamba_kernels"]["source"].startswith("torch ops")


@pytest.mark.parametrize("plant, expected", [
    (lambda g: g["record"]["s_pred"].__setitem__(5, g["record"]["s_pred"][5] + 1e-2),
     "fp32_dense: s_pred row 5: device"),
    (lambda g: g["record"]["s_ema"].__setitem__(2, g["record"]["s_ema"][2] - 2e-3),
     "fp32_dense: s_ema row 2: device"),
    (lambda g: g["record"]["logprobs"][3].__setitem__(1, g["record"]["logprobs"][3][1] + 5e-3),
     "fp32_dense: logprobs row 3 token 1: device"),
    (lambda g: g["record"]["thought_tokens"][7].__setitem__(
        4, g["record"]["thought_tokens"][7][4] + 1), "fp32_dense: thought_tokens row 7 token 4"),
    (lambda g: g["steps"][0].__setitem__("grad_norm", g["steps"][0]["grad_norm"] * 1.01),
     "fp32_dense: step-1 grad norm device"),
])
def test_one_planted_wrong_number_fails(plant, expected):
    ref = _ref()
    got = copy.deepcopy(ref)
    plant(got)
    fails = cmp.compare_record("fp32_dense", got, ref)
    assert len(fails) == 1 and fails[0].startswith(expected), fails


def test_params_after_the_update_are_compared():
    ref = _ref()
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    got = copy.deepcopy(ref)
    sample = got["params"][name]["sample"]
    for i in range(0, len(sample), 2):  # a wrong gradient: half the elements move the other way
        sample[i] = -sample[i]
    fails = cmp.compare_params("fp32_dense", got["params"], ref["params"])
    assert len(fails) == 1 and f"{name} 128 of 256 sampled updates differ" in fails[0], fails
    got = copy.deepcopy(ref)
    got["params"][name]["sample"][:3] = [-v for v in ref["params"][name]["sample"][:3]]
    assert cmp.compare_params("fp32_dense", got["params"], ref["params"]) == []  # 3 <= 2%
    got["params"][name]["norm"] *= 1 + 1e-4
    assert cmp.compare_params("fp32_dense", got["params"], ref["params"]) == [
        f"fp32_dense: {name} norm after the update {got['params'][name]['norm']:.6f} vs "
        f"reference {ref['params'][name]['norm']:.6f}"]


def test_a_run_of_another_shape_is_refused():
    ref = _ref()
    got = copy.deepcopy(ref)
    got["overrides"] = [*got["overrides"], "rlp.group_size=2"]
    fails = cmp.compare_record("fp32_dense", got, ref)
    assert len(fails) == 1 and "rlp.group_size=2" in fails[0]


def test_bf16_steps_skipped_or_non_finite_fail():
    steps = [{"step": k, "loss": 0.1, "grad_norm": 1.0, "skipped": 0.0} for k in (1, 2, 3)]
    assert cmp.check_steps("bf16_dense", steps, 3) == []
    bad = copy.deepcopy(steps)
    bad[1]["skipped"], bad[2]["grad_norm"] = 1.0, float("nan")
    assert cmp.check_steps("bf16_dense", bad, 3) == [
        "bf16_dense: step 2 skipped its update (non-finite loss or gradient)",
        "bf16_dense: step 3 non-finite grad_norm"]
    assert cmp.check_steps("bf16_dense", steps[:2], 3) == ["bf16_dense: 2 of 3 steps ran"]


def test_flex_vs_mask_tolerances():
    bench = {"loss": {"mask": 0.5, "flex": 0.501}, "loss_abs_diff": 1e-3,
             "grad_max_abs_diff": 1e-3, "grad_max_abs": 0.1}
    assert cmp.check_flex_vs_mask(bench, "bf16") == []
    assert len(cmp.check_flex_vs_mask(bench, "fp32")) == 2
    bench["grad_max_abs_diff"] = 0.01  # 10% of the largest gradient entry
    assert cmp.check_flex_vs_mask(bench, "bf16") == [
        "packed_attention: flex-vs-mask gradient max |diff| 1.00e-02 > 5e-02 x max |grad| "
        "1.00e-01 (bf16)"]


def test_a_hanging_stage_is_killed_at_its_cap(tmp_path):
    """The child and the process it started (as inductor's compile workers are) both die."""
    pid_file = tmp_path / "grandchild"
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    start = time.monotonic()
    rc, seconds = gpu_check.run_child(["-c", code], 3, tmp_path / "hang.log")
    assert rc == 124 and seconds < 20 and time.monotonic() - start < 20
    assert "killed at its cap of 3 s" in (tmp_path / "hang.log").read_text()
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)
    state = Path(f"/proc/{grandchild}/stat")
    assert not state.exists() or state.read_text().split()[2] == "Z"


def test_a_group_runs_side_by_side_each_child_to_its_own_cap(tmp_path):
    children = [gpu_check.Child(["-c", f"import time; time.sleep({t})"], cap,
                                tmp_path / f"{i}.log") for i, (t, cap) in
                enumerate([(2, 30), (2, 30), (60, 2)])]
    start = time.monotonic()
    gpu_check.run_children(children, jobs=3, stagger_s=0.2)
    assert [c.rc for c in children] == [0, 0, 124]
    assert time.monotonic() - start < 10  # side by side: 2 s each, the third cut at 2 s


def test_stage_over_its_cap_fails_with_a_line_and_outputs_are_packed(tmp_path):
    """The preflight (an import of torch and Megatron) cannot finish in 1 s: the report says
    so, nothing after it runs, and OUT holds the 2 packed files only."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out),
                           "--cap", "preflight=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "[gpu_check]   preflight: killed at its cap of 1 s" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check_logs.txt"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert not report["ok"] and list(report["stages"]) == ["preflight"]
    assert "===== preflight =====" in (out / "gpu_check_logs.txt").read_text()


def _fake_python(tmp_path: Path, without: str) -> Path:
    """A python that works except that `-c` snippets importing `without` fail."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ] && [[ "$2" == *"{without}"* ]]; '
                    f'then exit 1; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("case, message", [
    ("torch", "torch does not import"),
    ("version_info", "not a Python >= 3.12"),
    ("no_wheels", "holds no wheels"),
    ("bad_sum", "does not match"),
])
def test_script_names_what_is_wrong(tmp_path, case, message):
    wheels = tmp_path / "wheels"
    if case == "bad_sum":
        shutil.copytree(ROOT / "wheels", wheels)
        (wheels / "einops-0.8.2-py3-none-any.whl").write_bytes(b"not a wheel")
    else:
        wheels.mkdir()
    python = _fake_python(tmp_path, case) if case in ("torch", "version_info") else \
        Path(sys.executable)
    env = {**os.environ, "PYTHON": str(python), "WHEELS": str(wheels),
           "OUT": str(tmp_path / "out"), "GPU_CHECK_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "site").exists()


@pytest.mark.slow
def test_fp32_stage_on_cpu_against_the_shipped_reference(tmp_path):
    """The fp32 stage as the GPU runs it, on CPU: against a copy of the references with one
    S_pred moved by 1e-2 it fails with that line; the run itself equals the real reference."""
    planted = tmp_path / "ref"
    shutil.copytree(REF, planted)
    ref = _ref()
    ref["record"]["s_pred"][3] += 1e-2
    (planted / "tiny_dense_fp32.json").write_text(json.dumps(ref))
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out),
                           "--work", str(work), "--stages", "fp32_dense", "--references",
                           str(planted)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[gpu_check]   fp32_dense: s_pred row 3: device" in proc.stdout, proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failures"] == [line for line in report["stages"]["fp32_dense"]["failures"]]
    assert len(report["failures"]) == 1 and "(|diff| 1.0e-02 > 1e-03)" in report["failures"][0]
    got = json.loads((work / "fp32_dense.json").read_text())
    assert cmp.compare_record("fp32_dense", got, _ref()) == []


@pytest.mark.slow
def test_full_dry_run_through_the_launcher(tmp_path):
    """Every stage on CPU: wheels installed with --target, the kernels under the Triton
    interpreter, the fp32 stages against the shipped references; <= 3 files in OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1",
           "GPU_CHECK_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert len(list(out.iterdir())) <= 3
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and list(report["stages"]) == list(gpu_check.STAGES)
    stages = report["stages"]
    assert stages["preflight"]["machine"]["megatron.core_from"].startswith(str(tmp_path / "site"))
    assert stages["kernels"]["interpreter"] and not stages["kernels"]["failures"]
    assert stages["fp32_hybrid"]["run"]["mamba_kernels"]["source"].startswith("torch ops")
    assert stages["packed_attention"]["loss_abs_diff"] <= 2e-2 * abs(
        stages["packed_attention"]["loss"]["mask"])
    q = stages["qwen3_shape"]
    assert q["work"]["packed"] and q["work"]["tokens"] < q["work"]["rows"] * (
        q["work"]["mean_prefix_tokens"] + 8 + 2)  # shared windows counted once
    for key in ("decode_tokens_per_s", "update_tokens_per_s", "update_mfu", "peak_memory_gib"):
        assert q[key] > 0, key
