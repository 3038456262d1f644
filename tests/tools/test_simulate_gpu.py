"""tools/simulate_gpu.py: one RLP step on simulated CUDA (fake tensors, fake process group).

The fast cases run the tiny recipe at TP=2 x PP=2 in bf16 on `cuda` for the first and the
last pipeline stage, and a mutant of the step that leaves one tensor on the host, which the
simulation must refuse with one line naming the op, the tensor and the file:line. The
full-size recipes (slow) write the JSON committed under docs/simulated/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.fresh_process import cuda_is_mapped_to_cpu, rerun_in_fresh_process
from helpers.simulation import one_error_line

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/simulate_gpu.py"
TINY_TP2_PP2 = ["--config", "examples/configs/tiny_cpu.yaml", "--world-size", "4",
                "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                "precision.params_dtype=bf16", "rlp.max_thought_tokens=8", "--decode-steps", "2"]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_tiny_tp2_pp2_first_and_last_stage(tmp_path):
    out = tmp_path / "tiny.json"
    proc = _run([str(TOOL), *TINY_TP2_PP2, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = {r["stage"]: r for r in report["ranks"]}
    assert set(stages) == {"first", "last"}
    assert [r["rank"] for r in report["ranks"]] == [0, 3]
    for r in report["ranks"]:
        assert r["layout"] == {"tp": 2, "pp": 2, "dp": 1, "ep": 1}
        assert r["fits"] and 0 < r["peak_gib"] <= r["device_gib"]
        # every phase of the step ran and was measured
        assert {"rollout", "scoring", "update", "optimizer", "ema"} <= set(r["peak_gib_by_phase"])
        assert r["flops_by_phase"]["update"] > r["flops_by_phase"]["scoring"] > 0
        assert r["decode_steps"]["run"] == 2 and r["decode_steps"]["skipped"] > 0
        assert r["kv_ssm_cache_bytes"] > 0
    # the model's parameters are split over two stages: each holds a part, not all
    assert stages["first"]["params_bytes"] > 0 and stages["last"]["params_bytes"] > 0


def test_a_host_tensor_in_the_step_is_refused_with_one_line(tmp_path):
    """Mutant: the advantages meet a tensor built on the host (no device=), as a bug in the
    step would do; on a GPU that add raises, and so must the simulation, naming it."""
    mutant = tmp_path / "mutant.py"
    mutant.write_text(textwrap.dedent(f"""
        import runpy, sys
        import torch
        import megatron_rlp.train.rlp_step as step

        original = step.group_advantages

        def planted(rewards):
            advantages = original(rewards)
            host_bias = torch.zeros(advantages.shape)  # the bug: no device=
            return advantages + host_bias

        step.group_advantages = planted
        sys.argv = ["simulate_gpu.py", *{TINY_TP2_PP2!r}, "--stage", "first"]
        runpy.run_path({str(TOOL)!r}, run_name="__main__")
    """))
    proc = _run([str(mutant)])
    line = one_error_line(proc)
    assert "aten.add" in line and "`host_bias` (cpu" in line and "cuda:0" in line, line
    assert f"{mutant}:11" in line, line


def test_host_values_shadow_data_and_read_model_outputs_as_worst_case():
    """Data-derived values are exact beside fake CUDA tensors; a sampled id (no value) reads as
    0 (never `</think>`); an unknown integer of a large tensor is refused with its line."""
    if cuda_is_mapped_to_cpu():  # an earlier test in this process maps cuda to cpu: run fresh
        rerun_in_fresh_process(
            __file__, "test_host_values_shadow_data_and_read_model_outputs_as_worst_case")
        return
    sys.path.insert(0, str(ROOT / "tools"))
    import torch
    from simulated_values import HostValues, Oracle, UnknownValue
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), HostValues(Oracle(), zero_limit=64):
        lengths = torch.tensor([3, 7, 5]).to("cuda")  # host data moved to the device
        assert lengths.device.type == "cuda"
        assert int(lengths.max()) == 7
        assert torch.unique(lengths % 2).shape == (1,)  # value-dependent shape, from the value
        # torch.equal returns a host bool (the split attention's layout check): from the values
        assert torch.equal(lengths, lengths) and not torch.equal(lengths, lengths + 1)
        logits = torch.randn(4, 100, device="cuda")  # a model output: no value
        token = logits.argmax(-1)  # [4] long, from a bf16/fp32 tensor: unknown
        assert not bool((token == 99).any())  # read as zeros
        assert float(torch.randn(3000, device="cuda").sum()) == 0.0  # a loss: read as 0.0
        # an activation at a known mask (Mamba's packed windows): the mask gives the shape
        keep = torch.tensor([[True, False, True], [True, True, False]]).to("cuda")
        assert torch.randn(2, 3, 4, device="cuda", dtype=torch.bfloat16)[keep].shape == (4, 4)
        with pytest.raises(UnknownValue, match="test_simulate_gpu.py"):
            int(torch.randn(100, 100, device="cuda").long().sum())  # a count of 10^4 unknowns
        # a data-derived mask over 2**26 elements (Nano 12B's prefill mask is ~98M) keeps
        # its value: the shadow limit is 2**28 elements
        pos = torch.arange(9000).to("cuda")
        causal = pos[:, None] >= pos[None, :]  # 81M bools
        assert int(causal.sum()) == 9000 * 9001 // 2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["qwen3_1p7b", "nemotron_h_8b",  # with committed JSON
                                    "nemotron_nano_12b_v2"])
def test_full_size_recipe_at_its_stated_layout(recipe, tmp_path):
    out = tmp_path / f"{recipe}.json"
    committed = json.loads((ROOT / f"docs/simulated/{recipe}.json").read_text())
    proc = _run([str(TOOL), "--config", f"examples/configs/{recipe}.yaml",
                 *committed.get("overrides", ()), "--out", str(out)], timeout=3600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: does not fit (the JSON says)
    report = json.loads(out.read_text())
    assert report["world_size"] == 32
    for new, old in zip(report["ranks"], committed["ranks"], strict=True):
        assert new["stage"] == old["stage"]
        assert new["peak_gib"] == pytest.approx(old["peak_gib"], rel=0.02)


def test_python_engine_gives_the_cpp_engines_gradients():
    """The backward stand-in (tools/simulated_autograd.py) on real CPU tensors: the same
    leaf gradients as PyTorch's engine, through a custom autograd.Function, a broadcast add
    (summed back to shape), a split (multi-output node, one output unused), a bf16 cast (the
    gradient cast back) and `torch.autograd.grad` with `inputs`."""
    sys.path.insert(0, str(ROOT / "tools"))
    from unittest import mock

    import torch
    from simulated_autograd import PythonEngine

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, scale):
            ctx.scale = scale
            return a * scale

        @staticmethod
        def backward(ctx, g):
            return g * ctx.scale, None

    def loss_and_leaves():
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(6, 4, generator=gen, requires_grad=True)
        b = torch.randn(4, generator=gen, requires_grad=True)
        x = torch.randn(3, 6, generator=gen)
        h = Double.apply(x @ w + b, 3.0)
        first, _unused = h.split(2, dim=1)
        y = first.to(torch.bfloat16).float().tanh() * h[:, :2]
        return y.pow(2).sum(), (w, b)

    loss, (w, b) = loss_and_leaves()
    loss.backward()
    expected = (w.grad.clone(), b.grad.clone())
    loss, (w, b) = loss_and_leaves()
    grads_expected = torch.autograd.grad(loss, (b,))
    with mock.patch.object(torch.autograd.Variable, "_execution_engine", PythonEngine()):
        loss, (w, b) = loss_and_leaves()
        loss.backward()
        got = (w.grad, b.grad)
        loss, (w2, b2) = loss_and_leaves()
        grads = torch.autograd.grad(loss, (b2,))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads_expected[0], rtol=0, atol=0)
    assert w2.grad is None  # autograd.grad accumulates nothing


def test_python_engine_lets_go_of_saved_tensors_once_their_node_ran():
    """Under `PythonEngine.saved()` a node's saved tensors are released after it ran, as the
    C++ engine does, although the loss (and so the graph) is still referenced: without it every
    update micro-batch's activations stayed alive (47 GiB each at Qwen3 size)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from unittest import mock

    import torch
    from simulated_autograd import PythonEngine

    engine = PythonEngine()
    with mock.patch.object(torch.autograd.Variable, "_execution_engine", engine), \
            engine.saved():
        w = torch.randn(4, 4, requires_grad=True)
        loss = (torch.randn(8, 4) @ w).tanh().sum()
        tanh = loss.grad_fn.next_functions[0][0]
        assert tanh._saved_result.shape == (8, 4)  # held before the backward
        loss.backward()
    assert w.grad is not None and w.grad.shape == (4, 4)
    with pytest.raises(RuntimeError, match="after its node ran"):
        tanh._saved_result  # noqa: B018 (the read is the test)


def test_python_engine_frees_activations_during_the_backward_as_the_cpp_engine_does():
    """Memory (PyTorch's MemTracker, real CPU tensors) after a backward while the loss, and so
    the graph, is still referenced: the Python engine ends where the C++ engine does (the
    weight gradients). It ran each node with grad mode on, recording the backward's own
    graph, which kept every saved activation and every gradient until the graph died: the
    simulated Qwen3 update grew ~0.4 GiB a layer through its backward."""
    sys.path.insert(0, str(ROOT / "tools"))
    import contextlib
    from unittest import mock

    import torch
    from simulated_autograd import PythonEngine
    from torch.distributed._tools.mem_tracker import MemTracker

    def after_backward(python: bool) -> tuple[int, int]:
        tracker, engine = MemTracker(), PythonEngine()

        def now() -> int:
            return sum(v.get("Total", 0) for v in tracker._curr_mem_snap.values())

        with contextlib.ExitStack() as stack:
            stack.enter_context(tracker)
            if python:
                stack.enter_context(mock.patch.object(torch.autograd.Variable,
                                                      "_execution_engine", engine))
                stack.enter_context(engine.saved())
            layers = [torch.nn.Linear(256, 256) for _ in range(4)]
            h, start = torch.randn(512, 256), now()
            for layer in layers:
                h = torch.nn.functional.gelu(layer(h))
            loss = h.sum()
            forward = now() - start
            loss.backward()
            return forward, now() - start

    cpp, python = after_backward(False), after_backward(True)
    assert python == cpp
    assert cpp[1] < cpp[0] / 2  # the activations went, the weight gradients stayed


@pytest.mark.parametrize(("recipe", "world"), [("qwen3_1p7b", 32), ("nemotron_h_8b", 32),
                                               ("qwen3_30b_a3b", 64),
                                               ("nemotron_3_nano_30b_a3b", 64)])
def test_default_world_is_the_recipes_stated_one(recipe, world):
    """Dense recipes state 4 nodes x 8 GPUs, the MoE ones 8 x 8 (docs/moe.md)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from simulate_gpu import default_world_size

    from megatron_rlp.config import load_config

    assert default_world_size(load_config(ROOT / f"examples/configs/{recipe}.yaml")) == world


def test_module_dtype_cast_of_fake_parameters_is_done_in_place():
    """`Float16Module`'s `.bfloat16()` of a module that keeps fp32 parameters (Megatron's
    Mamba mixer: A_log, D, dt_bias) cast them on fake CUDA (`swap_tensors` refuses fake
    parameters, which stopped Nemotron-H at build), and a device move still fails. In a fresh
    process: the CPU backend, once active in this one, maps cuda to cpu."""
    code = textwrap.dedent("""
        import sys
        from unittest import mock

        import pytest
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        sys.path.insert(0, "tools")
        from simulated_cuda import _apply_unless_identity

        with FakeTensorMode(), mock.patch.object(
                torch.nn.Module, "_apply", _apply_unless_identity(torch.nn.Module._apply)):
            outer = torch.nn.Sequential(
                torch.nn.Linear(4, 4, device="cuda", dtype=torch.bfloat16))
            outer[0].A_log = torch.nn.Parameter(torch.zeros(4, device="cuda"))  # fp32
            a_log = outer[0].A_log
            outer.bfloat16()
            assert outer[0].A_log is a_log and a_log.dtype == torch.bfloat16
            assert a_log.device.type == "cuda"
            with pytest.raises(RuntimeError):
                outer.to("cpu")
        print("cast in place")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "cast in place" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("recipe", ["qwen3_1p7b", "nemotron_h_8b", "nemotron_nano_12b_v2",
                                    "nemotron_3_nano_30b_a3b", "qwen3_30b_a3b"])
def test_estimate_agrees_with_the_committed_simulation(recipe):
    """The memory estimate (`train.memory.estimate`, what start-up checks a launch with)
    within 15% of the committed full-size simulation for the persistent state and the
    rollout phase of every simulated stage, and for the peak and the update phase of the
    worst one: Qwen3's update runs FlexAttention's fused stand-in
    (tools/simulated_attention.py), the hybrids' Mamba layers mamba-ssm's
    (tools/simulated_mamba.py); the MoE recipes (PP=2, EP=8) count the 2 micro-batches
    1F1B keeps in flight on their first stage."""
    from megatron_rlp.config import load_config
    from megatron_rlp.train import memory

    sim = json.loads((ROOT / f"docs/simulated/{recipe}.json").read_text())
    attention = sim["simulated_with"]["model.packed_attention"]
    cfg = load_config(ROOT / f"examples/configs/{recipe}.yaml",
                      (*sim.get("overrides", ()), "device.type=cuda",
                       f"model.packed_attention={attention}"),
                      world_size=sim["world_size"])
    est = memory.estimate(cfg, sim["world_size"], 151669 if "qwen" in recipe else 131072,
                          overhead_gib=0)
    gib = 2**30
    persistent = sum(est["persistent"].values()) / gib
    # rollout: the cache, the Mamba state and the larger of one prefill layer (one row per
    # document window with rlp.share_prefixes, as packing/prefill.py runs it) and the logits
    rollout = persistent + est["phase_totals"]["rollout"] / gib
    for rank in sim["ranks"]:
        assert persistent == pytest.approx(rank["built_gib"] + rank["first_step_state_gib"],
                                           rel=0.15), rank["stage"]
        assert rollout == pytest.approx(rank["peak_gib_by_phase"]["rollout"], rel=0.15)
    update = persistent + est["phase_totals"]["update"] / gib
    peak = persistent + max(est["phase_totals"].values()) / gib
    assert peak == pytest.approx(max(r["peak_gib"] for r in sim["ranks"]), rel=0.15)
    assert update == pytest.approx(max(r["peak_gib_by_phase"]["update"] for r in sim["ranks"]),
                                   rel=0.15)


def test_megatron_moe_copies_token_counts_to_the_host_on_simulated_cuda():
    """Megatron's MoE dispatcher copies its token counts to the host and records the stream
    (`moe_utils.maybe_move_tensor_to_cpu`); `simulated_cuda` lets it (`record_stream` on a
    `NullStream` raised "unknown parameter type" and stopped the MoE recipes' rollout).
    In a fresh process: the CPU backend, once active in this one, maps cuda to cpu."""
    code = textwrap.dedent("""
        import sys

        import torch
        from megatron.core.transformer.moe.moe_utils import maybe_move_tensor_to_cpu
        from torch._subclasses.fake_tensor import FakeTensorMode

        sys.path.insert(0, "tools")
        from simulated_cuda import simulated_cuda

        with simulated_cuda(), FakeTensorMode():
            counts = torch.zeros(8, dtype=torch.long, device="cuda")
            host = maybe_move_tensor_to_cpu(counts, record_stream=True)
            assert host.device.type == "cpu" and host.shape == (8,)
        print("copied")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "copied" in out.stdout, out.stderr[-2000:]
