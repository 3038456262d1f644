"""tools/simulated_moe.py: MoE recipes under the simulated-CUDA step (tools/simulate_gpu.py).

The fast cases: the two rules on their own (the routers' even / worst-case choice, the
collectives of host-shadowed counts as repetition of the local value), the tiny MoE recipe
at EP=2 on a fake world of 2 through the whole step under both routing rules, and a mutant
that leaves a tensor on the host in the package's MoE path (the rollout's routing record),
which the simulation must refuse in one line. The full-size MoE recipes (slow) write the
JSON committed under docs/simulated/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.simulation import one_error_line

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/simulate_gpu.py"
TINY_MOE_EP2 = ["--config", "examples/configs/tiny_moe_cpu.yaml", "--world-size", "2",
                "parallel.expert_model_parallel_size=2", "precision.params_dtype=bf16",
                "rlp.max_thought_tokens=8", "--decode-steps", "2"]
sys.path.insert(0, str(ROOT / "tools"))


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    # without TRITON_INTERPRET, which an earlier kernel test of the suite can leave set: under
    # it Megatron's MoE layer takes another (Triton) path whose no-grad peak is ~5% larger
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("tokens,experts,topk", [(512, 8, 2), (37, 128, 8), (5, 4, 3)])
def test_even_routing_gives_every_expert_its_share(tokens, experts, topk):
    from simulated_moe import even_routing_map

    routing = even_routing_map(tokens, experts, topk)
    assert routing.shape == (tokens, experts) and routing.dtype == torch.bool
    assert (routing.sum(1) == topk).all()  # top-k distinct experts per token
    per_expert = routing.sum(0)
    assert int(per_expert.max() - per_expert.min()) <= 1
    assert int(per_expert.sum()) == tokens * topk


def test_worst_routing_sends_every_token_to_this_ranks_experts():
    from simulated_moe import worst_routing_map

    routing = worst_routing_map(6, 16, 3, local=[8, 9, 10, 11])
    assert routing[:, 8:11].all() and int(routing.sum()) == 6 * 3
    fewer = worst_routing_map(2, 8, 3, local=[6, 7])  # fewer local experts than top-k
    assert fewer[:, 6:].all() and int(fewer.sum(1).min()) == 3


def test_collectives_of_shadowed_counts_repeat_the_local_value():
    """On a fake world of 4: an all-gather of a shadowed count tensor holds it 4 times, an
    all-to-all hands this rank's own chunk (rank 1: the second) from every peer; without
    the rule the gathered tensor keeps its pre-collective zeros. In a fresh process (fake
    process group, CUDA)."""
    code = textwrap.dedent("""
        import sys

        import torch
        import torch.distributed as dist
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.testing._internal.distributed.fake_pg import FakeStore

        sys.path.insert(0, "tools")
        from simulated_cuda import simulated_cuda
        from simulated_moe import collective_values
        from simulated_values import HostValues, Oracle

        dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
        for rule in (collective_values, None):
            with simulated_cuda(), FakeTensorMode(), HostValues(Oracle()) as values:
                values.collectives = rule
                counts = torch.arange(8, device="cuda") * 3  # shadowed: host data
                gathered = torch.empty(32, dtype=torch.long, device="cuda")
                dist.all_gather_into_tensor(gathered, counts)
                swapped = torch.empty(8, dtype=torch.long, device="cuda")
                dist.all_to_all_single(swapped, counts)
                print(rule is not None, gathered.tolist() == (counts.tolist() * 4),
                      swapped.tolist() == [6, 9] * 4, gathered.sum().item())
        dist.destroy_process_group()
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    with_rule, without = out.stdout.split("\n")[:2]
    assert with_rule == "True True True 336", out.stdout
    assert without == "False False False 0", out.stdout


@pytest.mark.slow  # 24 s; the default suite runs the tiny MoE EP=2 step in the mutant test
def test_tiny_moe_at_ep2_runs_the_step_under_both_routing_rules(tmp_path):
    """The whole step (rollout, scoring, update, optimizer, EMA) of the tiny MoE recipe at
    EP=2: even routing sizes the expert buffers to the top-k copies of this rank's own
    tokens, the worst case (every rank routes to this rank's experts) to EP times that."""
    reports = {}
    for rule in ("even", "worst"):
        out = tmp_path / f"{rule}.json"
        proc = _run([str(TOOL), *TINY_MOE_EP2, "--moe-routing", rule, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[rule] = json.loads(out.read_text())
    even, worst = (reports[r]["ranks"][0] for r in ("even", "worst"))
    assert reports["even"]["simulated_with"]["moe_routing"] == "even"
    assert even["layout"] == {"tp": 1, "pp": 1, "dp": 2, "ep": 2}
    assert {"rollout", "scoring", "update", "optimizer", "ema"} <= set(even["peak_gib_by_phase"])
    assert even["fits"] and even["params_bytes"] == worst["params_bytes"]
    # the routed experts' GEMMs run twice the rows (EP=2) under the worst case
    assert worst["flops_by_phase"]["update"] > 1.3 * even["flops_by_phase"]["update"]
    assert worst["peak_gib_by_phase"]["update"] > even["peak_gib_by_phase"]["update"]


def test_a_host_tensor_in_the_moe_path_is_refused_with_one_line(tmp_path):
    """Mutant: the rollout's routing record (`models.moe_routing.pack_routing`, which packs
    each MoE layer's routing map) meets a mask built on the host; the simulation names it."""
    mutant = tmp_path / "mutant.py"
    mutant.write_text(textwrap.dedent(f"""
        import runpy, sys
        import torch
        import megatron_rlp.models.moe_routing as routing

        original = routing.pack_routing

        def planted(maps):
            host_mask = torch.ones(maps.shape, dtype=torch.bool)  # the bug: no device=
            return original(maps & host_mask)

        routing.pack_routing = planted
        sys.argv = ["simulate_gpu.py", *{TINY_MOE_EP2!r}]
        runpy.run_path({str(TOOL)!r}, run_name="__main__")
    """))
    proc = _run([str(mutant)])
    line = one_error_line(proc)
    assert "aten.bitwise_and" in line and "`host_mask` (cpu" in line and "cuda:0" in line, line
    assert f"{mutant}:10" in line, line


@pytest.mark.parametrize("recipe", ["qwen3_30b_a3b", "nemotron_3_nano_30b_a3b"])
def test_estimates_moe_terms_agree_with_one_simulated_full_size_layer(recipe):
    """`train/memory.py`'s MoE terms within 15% of one full-size MoE layer on simulated
    CUDA at EP=8 with even routing (tools/simulate_moe_layer.py): the bytes kept for
    backward per token (`moe_bytes`) and the no-grad forward's peak (`moe_transient_bytes`).
    512 tokens: the per-token figures do not depend on the count (4608 gives the same)."""
    proc = _run([str(ROOT / "tools/simulate_moe_layer.py"), "--config",
                 f"examples/configs/{recipe}.yaml", "--tokens", "512"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert r["moe_bytes"] == pytest.approx(r["kept_bytes_per_token"], rel=0.15), r
    assert r["moe_transient_bytes"] == pytest.approx(r["no_grad_peak_bytes_per_token"],
                                                     rel=0.15), r


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["qwen3_30b_a3b", "nemotron_3_nano_30b_a3b"])
def test_full_size_moe_recipe_at_its_stated_layout(recipe, tmp_path):
    """64 GPUs, TP1 x PP2 x EP8, both stages, even routing: the JSON of docs/simulated/."""
    out = tmp_path / f"{recipe}.json"
    proc = _run([str(TOOL), "--config", f"examples/configs/{recipe}.yaml", "--out", str(out)],
                timeout=3600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: runs, but does not fit
    report = json.loads(out.read_text())
    assert report["world_size"] == 64
    assert [r["stage"] for r in report["ranks"]] == ["first", "last"]
    for r in report["ranks"]:
        assert r["layout"] == {"tp": 1, "pp": 2, "dp": 32, "ep": 8}
        assert r["kv_ssm_cache_bytes"] > 0 and r["flops_by_phase"]["update"] > 0
