"""Expert parallelism proven like every other layout (tests/distributed/test_layouts.py): a tiny
MoE model (attention + MoE layers, 4 experts, top-2 softmax router) trained 3 RLP steps
under torchrun with gloo computes what the one-rank run computes: contexts and thoughts
exactly, log-probs, S_ema, S_pred, rewards, advantages, gradient norms and the final
parameters (every expert) within the tolerances of test_layouts.py, which this reuses. Every
layout also logs `routing_agreement` = 1.0 (fp32).

EP=2 splits each layer's 4 experts over the two data-parallel ranks: tokens travel to their
experts' rank through Megatron's all-to-all dispatcher, and expert gradients are reduced over
the expert-data-parallel group only. EP=2 with TP=2 or PP=2 takes 4 processes (slow).

`routing_agreement` where the routers are split (PP=2, TP=2 with sequence parallel, the
hybrid Mamba-MoE model under PP=2): each stage / sequence slice compares its own routers and
the ranks combine. It is 1.0 at step 1; test hooks (train/faults.py) then act on pipeline
stage 0's first MoE layer: `router_flip@2` negates its router between the rollout and the
update (step 2 < 1.0: the metric sees the update's routing), `routing_record_flip@3` inverts
the rollout's record of it (step 3 = 0.0 exactly: no other layer, stage or slice disagrees,
so the value is 0 only if stage 0's comparison of every sequence slice reaches the metric).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.step_reference import assert_records_match, merged_records
from layout_runs import ROOT, train_and_collect
from test_layouts import RECORD_ATOL, SMALL, assert_metrics_match, assert_params_match

CONFIG = "examples/configs/tiny_moe_cpu.yaml"
# Router losses off: Megatron defines the aux loss per micro-batch (sum_i f_i * P_i of that
# micro-batch's token fractions and mean scores) and the z-loss as a micro-batch mean, so
# their gradients depend on how tokens are grouped into micro-batches and ranks, in Megatron
# as here; tests/unit/test_moe.py checks they reach the gradients at their coefficients.
MOE = SMALL + ("model.hybrid_layer_pattern=*E*E", "model.num_experts=4",
               "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
               "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=null")
LAYOUTS = {
    "dp2": (),
    "ep2": ("parallel.expert_model_parallel_size=2",),
    "ep2-distributed-optimizer": ("parallel.expert_model_parallel_size=2",
                                  "parallel.use_distributed_optimizer=true"),
}
SLOW_LAYOUTS = {  # 4 processes on a 2-core machine: `pytest -m slow`
    "ep2-tp2-sequence-parallel": ("parallel.expert_model_parallel_size=2",
                                  "parallel.tensor_model_parallel_size=2",
                                  "parallel.sequence_parallel=true"),
    "ep2-pp2": ("parallel.expert_model_parallel_size=2",
                "parallel.pipeline_model_parallel_size=2"),
}


def run(tmp: Path, nproc: int, *overrides: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    return train_and_collect(tmp, nproc, CONFIG, *MOE, *overrides)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    rows, params = run(tmp, 1)
    return rows, params, merged_records(tmp / "record")


def _check(one_rank, tmp_path, rows, params) -> None:
    ref_rows, ref_params, ref_records = one_rank
    assert_metrics_match(ref_rows, rows)
    assert_params_match(ref_params, params)
    assert_records_match(ref_records, merged_records(tmp_path / "record"), RECORD_ATOL)
    # Megatron stores every layer's experts stacked ([experts, ...], the grouped-GEMM
    # format) whatever the EP split: all 4 are in the checkpoint, gathered from both ranks.
    experts = [k for k in params if ".mlp.experts.experts." in k and k.endswith(".weight")]
    assert len(experts) == 4 and all(params[k].shape[0] == 4 for k in experts)
    for row in ref_rows + rows:  # every layout logs it (models/moe_routing.py)
        assert row["routing_agreement"] == 1.0, row


# Default suite: ep2 only (each layout is a 2-process run of a minute or more here).
@pytest.mark.parametrize("layout", [k if k == "ep2" else pytest.param(k, marks=pytest.mark.slow)
                                    for k in LAYOUTS])
def test_expert_parallel_matches_one_rank(one_rank, tmp_path, layout):
    rows, params = run(tmp_path, 2, *LAYOUTS[layout])
    _check(one_rank, tmp_path, rows, params)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(SLOW_LAYOUTS))
def test_expert_parallel_with_tp_or_pp_matches_one_rank(one_rank, tmp_path, layout):
    rows, params = run(tmp_path, 4, *SLOW_LAYOUTS[layout])
    _check(one_rank, tmp_path, rows, params)


@pytest.mark.slow
def test_expert_parallel_checkpoint_resumes_bit_exactly_and_reshards(one_rank, tmp_path):
    """EP=2, 2 steps, save (experts sharded over the ranks), resume for step 3: bit-identical
    to the straight EP=2 run's parameters and metrics. The checkpoint also loads into one
    rank (EP=1, fresh Adam state) and trains on."""
    ep2 = LAYOUTS["ep2"]
    straight_rows, straight = run(tmp_path / "straight", 2, *ep2)
    save = tmp_path / "saved"
    run(save, 2, *ep2, "train.steps=2")
    rows, params = run(save, 2, *ep2, f"train.load={save / 'ckpt'}")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("s_ema", "s_pred", "reward_mean", "grad_norm"):
        assert rows[2][key] == straight_rows[2][key], key
    assert params.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(params[name], value), name
    # Into one rank (EP=1): weights and teacher reshard; Megatron's optimizer is chained
    # (dense + experts) only under EP > 1, so Adam's state is refused with one line, or left.
    cmd = [sys.executable, "pretrain_rlp.py", "--config", CONFIG, *MOE, "train.steps=4",
           f"train.load={save / 'ckpt'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "holds optimizer state of EP=2" in proc.stderr
    rows, _ = train_and_collect(tmp_path / "one", 1, CONFIG, *MOE, "train.steps=4",
                                f"train.load={save / 'ckpt'}", "train.load_optimizer=false")
    assert [r["step"] for r in rows] == [4]  # the resumed job saved step 3 there


HYBRID = ("model.hybrid_layer_pattern=ME*E", "model.mamba_num_heads=4",
          "model.mamba_head_dim=32", "model.mamba_state_dim=8",
          "model.moe_shared_expert_intermediate_size=64")
AGREEMENT_LAYOUTS = {  # name: (config, overrides); 2 processes each
    "pp2": (CONFIG, ("parallel.pipeline_model_parallel_size=2",)),
    "tp2-sequence-parallel": (CONFIG, ("parallel.tensor_model_parallel_size=2",
                                       "parallel.sequence_parallel=true")),
    # Nemotron-3 style: sigmoid router with expert bias, a shared expert; stages ME | *E
    "hybrid-pp2": ("examples/configs/tiny_hybrid_moe_cpu.yaml",
                   (*HYBRID, "parallel.pipeline_model_parallel_size=2")),
}


# Default suite: pp2 (the recipes' layout); each is a 2-process run of ~45 s here.
@pytest.mark.parametrize("layout", [k if k == "pp2" else pytest.param(k, marks=pytest.mark.slow)
                                    for k in AGREEMENT_LAYOUTS])
def test_routing_agreement_with_split_routers(tmp_path, monkeypatch, layout):
    config, overrides = AGREEMENT_LAYOUTS[layout]
    monkeypatch.setenv("MEGATRON_RLP_FAULTS", "router_flip@2,routing_record_flip@3")
    rows, _ = train_and_collect(tmp_path, 2, config, *MOE, *overrides, "train.steps=3")
    assert [r["step"] for r in rows] == [1, 2, 3]
    agreement = [r["routing_agreement"] for r in rows]
    assert agreement[0] == 1.0 and agreement[1] < 1.0 and agreement[2] == 0.0, agreement
