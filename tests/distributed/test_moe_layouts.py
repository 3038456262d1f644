"""Expert parallelism proven like every other layout (tests/distributed/test_layouts.py): a tiny
MoE model (attention + MoE layers, 4 experts, top-2 softmax router) trained 3 RLP steps
under torchrun with gloo computes what the one-rank run computes: contexts and thoughts
exactly, log-probs, S_ema, S_pred, rewards, advantages, gradient norms and the final
parameters (every expert) within the tolerances of test_layouts.py, which this reuses. Every
layout also logs `routing_agreement` = 1.0 (fp32).

EP=2 splits each layer's 4 experts over the two data-parallel ranks: tokens travel to their
experts' rank through Megatron's all-to-all dispatcher, and expert gradients are reduced over
the expert-data-parallel group only. EP=2 with TP=2 or PP=2 takes 4 processes (slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from layout_runs import train_and_collect
from test_layouts import RECORD_ATOL, SMALL, assert_metrics_match, assert_params_match

from helpers.step_reference import assert_records_match, merged_records

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
    for row in ref_rows + rows:
        if "routing_agreement" in row:  # logged without PP / SP
            assert row["routing_agreement"] == 1.0, row


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_matches_one_rank(one_rank, tmp_path, layout):
    rows, params = run(tmp_path, 2, *LAYOUTS[layout])
    _check(one_rank, tmp_path, rows, params)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(SLOW_LAYOUTS))
def test_expert_parallel_with_tp_or_pp_matches_one_rank(one_rank, tmp_path, layout):
    rows, params = run(tmp_path, 4, *SLOW_LAYOUTS[layout])
    _check(one_rank, tmp_path, rows, params)
