"""Which Mamba kernels Megatron's mixer gets (`models.mamba.adapter.select_kernels`): mamba-ssm's
only with mamba-ssm *and* causal-conv1d on CUDA, otherwise torch with one warning where kernels
were expected; the choice is what the metrics record. No interpreter needed: fast."""

from __future__ import annotations

import logging

import pytest
import torch
from megatron.core.ssm import mamba_mixer as mm

from megatron_rlp.models.mamba import adapter, ops
from megatron_rlp.train import loop


@pytest.fixture
def fresh_choice(monkeypatch):
    """A process that has not chosen yet; the torch path bound again afterwards."""
    monkeypatch.setattr(adapter, "_choice", None)
    yield
    adapter.select_kernels(force=adapter.TORCH)


def choose(monkeypatch, caplog, *, missing: str | None, cuda: bool) -> str:
    monkeypatch.setattr(adapter, "kernels_missing", lambda: missing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(adapter, "_mamba_ssm_globals", lambda: {"HAVE_MAMBA_SSM": True})
    with caplog.at_level(logging.INFO, logger=adapter.__name__):
        return adapter.select_kernels()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_cpu_without_kernels_is_torch_quietly(fresh_choice, monkeypatch, caplog):
    missing = "mamba_ssm.ops.triton.ssd_combined does not import (No module named 'x')"
    assert choose(monkeypatch, caplog, missing=missing, cuda=False) == adapter.TORCH
    assert not warnings_of(caplog) and "pure-torch" in caplog.text  # logged, no warning
    assert mm.mamba_chunk_scan_combined is adapter._chunk_scan
    assert mm.selective_state_update is ops.selective_state_update
    assert mm.causal_conv1d_fn is None and mm.HAVE_MAMBA_SSM


def test_cpu_with_kernels_is_still_torch(fresh_choice, monkeypatch, caplog):
    """Both packages import but no CUDA: Triton kernels cannot take CPU tensors."""
    assert choose(monkeypatch, caplog, missing=None, cuda=False) == adapter.TORCH
    assert not warnings_of(caplog)


@pytest.mark.parametrize("missing", ["causal_conv1d does not import (No module named "
                                     "'causal_conv1d')", "mamba_ssm.ops.triton.ssd_combined "
                                     "does not import (No module named 'selective_scan_cuda')"])
def test_gpu_without_both_packages_falls_back_with_one_warning(fresh_choice, monkeypatch,
                                                               caplog, missing):
    assert choose(monkeypatch, caplog, missing=missing, cuda=True) == adapter.TORCH
    assert adapter.select_kernels() == adapter.TORCH  # chosen once: no second warning
    (warning,) = warnings_of(caplog)
    assert missing in warning
    assert mm.mamba_split_conv1d_scan_combined is adapter._split_conv1d_scan  # never None


def test_cpu_with_mamba_ssm_but_no_causal_conv1d_warns(fresh_choice, monkeypatch, caplog):
    """A half install (mamba-ssm without causal-conv1d) is worth a warning anywhere."""
    missing = "causal_conv1d does not import (No module named 'causal_conv1d')"
    assert choose(monkeypatch, caplog, missing=missing, cuda=False) == adapter.TORCH
    assert len(warnings_of(caplog)) == 1


def test_gpu_with_both_packages_takes_the_kernels(fresh_choice, monkeypatch, caplog):
    assert choose(monkeypatch, caplog, missing=None, cuda=True) == adapter.MAMBA_SSM
    assert adapter.kernel_choice() == adapter.MAMBA_SSM and not warnings_of(caplog)
    assert loop.kernel_metrics()["mamba_kernels"] == adapter.MAMBA_SSM


def test_bad_force_is_refused():
    with pytest.raises(ValueError, match="force='cuda'"):
        adapter.select_kernels(force="cuda")
