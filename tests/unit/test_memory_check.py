"""Start-up refuses a CUDA launch whose estimated peak per GPU exceeds the GPU's memory, in one
line naming the peak, the device memory and the settings that would fit (startup.check_memory,
train/memory_fit.py); a launch that fits passes. No GPU needed: `device.memory_gib` stands in
for the device, and the launch path is run with the CUDA queries faked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rlp.config import ConfigError
from megatron_rlp.startup import check_memory, load_config, load_launch_config
from megatron_rlp.train.memory import GIB, estimate
from megatron_rlp.train.memory_fit import KNOBS, check_fits, fitting_settings

ROOT = Path(__file__).resolve().parents[2]
NANO = str(ROOT / "examples/configs/nemotron_nano_12b_v2.yaml")
QWEN = str(ROOT / "examples/configs/qwen3_1p7b.yaml")
VOCAB = 131072
RANDOM = ("train.allow_random_init=true",)


def _cfg(path: str, world: int, *overrides: str):
    return load_config(path, RANDOM + overrides, world_size=world)


def _suggested(message: str) -> list[tuple[str, str]]:
    """The `key=value` settings a refusal names (after "fits with ...")."""
    tail = message.split("fits with", 1)[1].split("; or device.skip_memory_check")[0]
    return re.findall(r"([a-z_]+\.[a-z_]+)=(\w+)", tail)


def test_a_launch_that_cannot_fit_is_refused_with_one_line_naming_what_fits():
    """The nano recipe's 32-GPU batch on one 8-GPU node in one rollout pass: refused; every
    setting the line names, applied alone, passes the same check."""
    cfg = _cfg(NANO, 8, "device.memory_gib=80", "rlp.rollout_chunk_contexts=0")
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, 8)
    text = str(err.value)
    assert "\n" not in text
    peak = estimate(cfg, 8, VOCAB)["total"] / GIB
    assert f"estimated peak {peak:.1f} GiB per GPU" in text and peak > 80
    assert "exceeds the device's 80.0 GiB (device.memory_gib" in text
    assert "device.skip_memory_check=true" in text
    fixes = _suggested(text)
    assert fixes and {k for k, _ in fixes} <= set(KNOBS), text
    assert ("rlp.rollout_chunk_contexts", "64") in fixes, text
    for key, value in fixes:
        fixed = _cfg(NANO, 8, "device.memory_gib=80", "rlp.rollout_chunk_contexts=0",
                     f"{key}={value}")
        assert check_memory(fixed, 8).startswith("estimated peak"), (key, value)


def test_the_shipped_recipe_fits_its_stated_world_and_opt_out_skips_the_check():
    cfg = _cfg(QWEN, 32, "device.memory_gib=80")
    said = check_memory(cfg, 32)
    peak = estimate(cfg, 32, 151936)["total"] / GIB
    assert said == f"estimated peak {peak:.1f} of 80.0 GiB per GPU" and peak < 80
    small = _cfg(QWEN, 8, "device.memory_gib=1")
    with pytest.raises(ConfigError):
        check_memory(small, 8)
    small.device.skip_memory_check = True
    assert check_memory(small, 8) == "memory not checked (device.skip_memory_check)"
    cpu = _cfg(QWEN, 32, "device.type=cpu", "device.memory_gib=1")
    assert check_memory(cpu, 32) == "memory not checked"


def test_no_single_knob_fits_then_a_combination_or_more_gpus():
    """Qwen3's 32-GPU batch on 8 GPUs under 60 GiB, its update through the explicit mask
    (unfused scores kept): no knob fits alone (the smallest rollout chunk leaves the update
    too big), the combination named, applied, fits; with no memory at all the line says to
    add GPUs."""
    cfg = _cfg(QWEN, 8, "rlp.rollout_chunk_contexts=0", "model.packed_attention=mask")
    vocab, limit = 151936, 60 * GIB
    alone, together = fitting_settings(cfg, 8, vocab, limit)
    assert not alone and together is not None
    changes, peak = together
    assert len(changes) >= 2 and peak <= limit
    fixed = _cfg(QWEN, 8, "rlp.rollout_chunk_contexts=0", "model.packed_attention=mask",
                 *(f"{k}={v}" for k, v in changes.items()))
    assert estimate(fixed, 8, vocab)["total"] == pytest.approx(peak)
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, 8, vocab, 60.0, "test")
    assert "fits with all of: " + " ".join(f"{k}={v}" for k, v in changes.items()) \
        in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, 8, vocab, 1.0, "test")
    assert "fits this world size: add GPUs" in str(err.value)


def test_refused_on_the_launch_path_before_torch_distributed(monkeypatch, capsys):
    """`load_launch_config` under torchrun's environment with one (faked) 80 GiB GPU per rank:
    exit 2, one `error:` line, torch.distributed never started."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)

    class Props:
        name, total_memory = "NVIDIA H100 80GB HBM3", 80 * GIB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    with pytest.raises(SystemExit) as stop:
        load_launch_config(NANO, RANDOM + ("rlp.rollout_chunk_contexts=0",))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: invalid launch: estimated peak"), err
    assert "(NVIDIA H100 80GB HBM3; 8 ranks, TP=8 PP=1 DP=1" in err[0]
    assert not torch.distributed.is_initialized()
    cfg = load_launch_config(NANO, RANDOM)  # the shipped chunk fits
    assert cfg.rlp.rollout_chunk_contexts == 64


def test_check_world_size_reports_the_estimate():
    def run(*args):
        return subprocess.run([sys.executable, "pretrain_rlp.py", "--config", NANO, *RANDOM,
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    ok = run("--check-world-size", "32", "device.memory_gib=80")
    assert ok.returncode == 0 and "config valid for 32 rank(s); estimated peak" in ok.stdout
    bad = run("--check-world-size", "8", "device.memory_gib=80", "rlp.rollout_chunk_contexts=0")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "fits with" in bad.stderr, bad.stderr


def test_memory_gib_must_be_positive():
    with pytest.raises(ConfigError, match=r"device\.memory_gib=0\.0 \(allowed: null"):
        _cfg(QWEN, 32, "device.memory_gib=0")
