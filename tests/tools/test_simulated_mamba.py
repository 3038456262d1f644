"""tools/simulated_mamba.py: the fused Mamba-kernel stand-ins of the GPU simulation.

On fake CUDA tensors: what each stand-in keeps for backward is what mamba-ssm's kernel keeps
(its inputs, out, dA_cumsum), not the torch scan's chunked intermediates; a device or dtype
mix the real kernel refuses fails in one line; the FLOPs are counted; the bound globals are
restored; a tiny hybrid simulates with them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import simulated_mamba as sm  # noqa: E402
from helpers.fresh_process import fresh_process_if_cuda_is_mapped  # noqa: E402
from simulated_autograd import PythonEngine  # noqa: E402
from simulated_values import SimulationError  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from megatron_rlp.models.mamba import ops  # noqa: E402

# One Nemotron-Nano-12B Mamba layer at TP=8 (16 heads of 80, one group of 128 states).
BATCH, LENGTH, HEADS, HEADDIM, GROUPS, STATE, CHUNK = 1, 300, 16, 80, 1, 128, 128


@pytest.fixture
def fake():
    with mock.patch.object(torch.autograd.Variable, "_execution_engine", PythonEngine()), \
            FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _scan_inputs(device="cuda"):
    def t(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    return dict(x=t(BATCH, LENGTH, HEADS, HEADDIM), dt=t(BATCH, LENGTH, HEADS),
                A=t(HEADS, dtype=torch.float32), B=t(BATCH, LENGTH, GROUPS, STATE),
                C=t(BATCH, LENGTH, GROUPS, STATE), D=t(HEADS, dtype=torch.float32),
                dt_bias=t(HEADS, dtype=torch.float32),
                initial_states=t(BATCH, HEADS, HEADDIM, STATE, dtype=torch.float32))


def _saved(fn) -> list[torch.Tensor]:
    """Every tensor autograd keeps for backward while `fn()` runs (parameters included)."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return kept, out


@fresh_process_if_cuda_is_mapped
def test_scan_keeps_the_fused_kernels_tensors_not_the_chunked_intermediates(fake):
    a = _scan_inputs()
    kept, y = _saved(lambda: sm.mamba_chunk_scan_combined(
        a["x"], a["dt"], a["A"], a["B"], a["C"], CHUNK, D=a["D"], dt_bias=a["dt_bias"],
        initial_states=a["initial_states"], dt_softplus=True))
    inputs = {id(v) for v in a.values()}
    new = [t for t in kept if id(t) not in inputs]
    chunks = -(-LENGTH // CHUNK)
    # MambaChunkScanCombinedFn.forward: save_for_backward(out, x, dt, dA_cumsum, A, B, C, D,
    # z, dt_bias, initial_states, seq_idx): all inputs but two, out and dA_cumsum
    assert sorted((tuple(t.shape), t.dtype) for t in new) == sorted([
        ((BATCH, LENGTH, HEADS, HEADDIM), torch.bfloat16),
        ((BATCH, HEADS, chunks, CHUNK), torch.float32)])
    assert y.shape == a["x"].shape and y.dtype == torch.bfloat16 and y.device.type == "cuda"
    torch_kept, _ = _saved(lambda: ops.mamba_chunk_scan_combined(
        a["x"], a["dt"], a["A"], a["B"], a["C"], CHUNK, D=a["D"], dt_bias=a["dt_bias"],
        initial_states=a["initial_states"], dt_softplus=True))
    # the torch scan keeps [.., T, T] decay blocks per head (what the stand-in replaces)
    assert any(t.shape[-2:] == (CHUNK, CHUNK) and t.dim() >= 5 for t in torch_kept)

    def nbytes(ts):
        return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in ts}.values()
                   if id(t) not in inputs)

    assert nbytes(torch_kept) > 10 * nbytes(new)
    y.sum().backward()
    for name, v in a.items():  # a grad of each input's shape on its device
        assert v.grad is not None and v.grad.shape == v.shape, name
        assert v.grad.device == v.device, name


@fresh_process_if_cuda_is_mapped
def test_gated_norm_keeps_its_rows_weight_and_rstd(fake):
    norm = sm.RMSNormGated(HEADS * HEADDIM, group_size=HEADS * HEADDIM, norm_before_gate=False,
                           device="cuda", dtype=torch.bfloat16)
    y = torch.randn(LENGTH, 1, HEADS * HEADDIM, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    z = torch.randn_like(y, requires_grad=True)
    kept, out = _saved(lambda: norm(y, z))
    assert [(tuple(t.shape), t.dtype) for t in kept] == [
        ((LENGTH, HEADS * HEADDIM), torch.bfloat16), ((HEADS * HEADDIM,), torch.bfloat16),
        ((LENGTH, HEADS * HEADDIM), torch.bfloat16), ((LENGTH,), torch.float32)]
    out.sum().backward()
    assert y.grad.shape == y.shape and z.grad.shape == z.shape
    assert norm.weight.grad.shape == norm.weight.shape


@fresh_process_if_cuda_is_mapped
def test_planted_device_and_dtype_mismatches_fail_in_one_line(fake):
    a = _scan_inputs()
    host_B = torch.randn(BATCH, LENGTH, GROUPS, STATE, dtype=torch.bfloat16)
    with pytest.raises(SimulationError) as e:
        sm.mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], host_B, a["C"], CHUNK)
    line = str(e.value)
    assert "\n" not in line and "`B` (cpu bfloat16" in line and "test_simulated_mamba.py:" in line
    x = torch.randn(1, 1536, 10, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 4, device="cuda", dtype=torch.bfloat16)
    fp32_bias = torch.randn(1536, device="cuda")  # causal-conv1d: bias.dtype == weight's
    with pytest.raises(SimulationError) as e:
        sm.causal_conv1d_fn(x, w, fp32_bias, activation="silu")
    line = str(e.value)
    assert "\n" not in line and "bias is torch.float32, weight torch.bfloat16" in line
    assert sm.causal_conv1d_fn(x, w, fp32_bias.bfloat16(), activation="silu").shape == x.shape


@fresh_process_if_cuda_is_mapped
def test_scan_flops_are_counted_forward_and_backward(fake):
    a = _scan_inputs()
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"], CHUNK)
    with FlopCounterMode(display=False) as torch_count:
        ops.mamba_chunk_scan_combined(*args, D=a["D"])
    with FlopCounterMode(display=False) as count:
        y = sm.mamba_chunk_scan_combined(*args, D=a["D"])
        forward = count.get_total_flops()
        y.sum().backward()
    assert forward == torch_count.get_total_flops() > 0  # the same chunked-scan formula
    L = -(-LENGTH // CHUNK) * CHUNK
    cb, intra, state = (2 * BATCH * L * GROUPS * CHUNK * STATE,
                        2 * BATCH * L * HEADS * CHUNK * HEADDIM,
                        2 * BATCH * L * HEADS * HEADDIM * STATE)
    assert forward == cb + intra + 2 * state
    assert count.get_total_flops() - forward == 3 * cb + 3 * intra + 5 * state


def test_binding_is_scoped_to_the_simulation():
    from megatron.core.ssm import mamba_mixer as mm

    from megatron_rlp.models.mamba import adapter

    adapter.select_kernels()
    before = (mm.mamba_chunk_scan_combined, mm.ExtendedRMSNorm, adapter.kernel_choice())
    with sm.fused_mamba_kernels():
        assert mm.mamba_chunk_scan_combined is sm.mamba_chunk_scan_combined
        assert issubclass(mm.ExtendedRMSNorm, sm.RMSNormGated)
        assert hasattr(mm.ExtendedRMSNorm, "sharded_state_dict")
        assert adapter.kernel_choice() == adapter.MAMBA_SSM
    assert (mm.mamba_chunk_scan_combined, mm.ExtendedRMSNorm, adapter.kernel_choice()) == before


def test_tiny_hybrid_simulates_with_the_fused_stand_ins(tmp_path):
    import subprocess

    out = tmp_path / "tiny_hybrid.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/simulate_gpu.py"),
         "--config", "examples/configs/tiny_hybrid_cpu.yaml", "--world-size", "2",
         "parallel.tensor_model_parallel_size=2", "precision.params_dtype=bf16",
         "rlp.max_thought_tokens=8", "--decode-steps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["simulated_with"]["mamba_kernels"] == "fused"
    # one step before the G-way fork (a row per context), one after it, the rest skipped
    # at the rows of the last decoded step (`DecodeCut`: --decode-steps 1 reused the
    # pre-fork logits for the forked rows)
    assert report["ranks"][0]["decode_steps"]["run"] == 2
    assert report["ranks"][0]["flops_by_phase"]["update"] > 0


@fresh_process_if_cuda_is_mapped
def test_layer_census_counts_less_with_the_fused_kernels():
    """`tools/simulated_census.py --mamba-layer` (the docs' per-layer table): the packed
    update's Mamba SSM keeps less with the stand-ins, and none of the torch scan's lines."""
    from simulated_census import mamba_layer_census

    fused, fused_sites = mamba_layer_census(4, 16, 1, 16, 200, 100, kernels="fused")
    torch_total, torch_sites = mamba_layer_census(4, 16, 1, 16, 200, 100, kernels="torch")
    assert 0 < fused < torch_total
    scan = [s for s in torch_sites if "mamba/norm.py" in s or "mamba/ops.py:1" in s]
    assert scan and not [s for s in fused_sites if s in scan]
