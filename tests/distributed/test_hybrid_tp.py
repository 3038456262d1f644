"""Tensor parallel for Mamba layers: a tiny hybrid (`M-M*-M-`) trained with RLP for 3 steps
under `torchrun` with 2 gloo processes and TP=2 reports what the one-rank run reports
(the same contexts and thoughts; per-thought log-probs, S_pred/S_ema, rewards, advantages,
gradient norms) and ends with the same parameters; its steps also equal the independent
reference of tests/helpers/step_reference.py (per-step checkpoints read back on one rank). Loss and
clip fraction are not compared for RLP: ~0 in every layout, they cannot tell layouts apart. With
`-m slow`: also TP=2 + sequence parallel (NTP) and PP=2 (pattern `M-M*|-M-`).

Both layouts start from the same weights: `LocalMambaMixer` draws Mamba parameters whole
and shards `in_proj`'s [z, x, B, C, dt] blocks one by one (see models/mamba/mixer.py). The
TP=2 mixer holds half of the heads and groups per rank; its gated RMSNorm normalises per
group, so it needs no communication.

Tolerances (fp32): metrics within 1e-5 (relative and absolute). Final parameters within 1e-5
of each tensor's scale plus 1e-4 of the largest possible Adam movement (lr x steps): Adam
scales every update to ~lr, so last-bit differences in tiny gradients (TP reduces partial
sums in another order) show up as a fraction of lr, not of the weight (seen: 2.9e-7 on an
out_proj of scale 0.02, lr 1e-3, 3 steps).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.step_reference import assert_records_match, check_run_against_reference, merged_records
from layout_runs import train_and_collect

SMALL = (
    "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.max_sequence_length=96", "model.mamba_num_heads=8",
    "model.mamba_head_dim=16", "model.mamba_state_dim=16", "model.mamba_num_groups=2",
    "rlp.contexts_per_step=4", "rlp.group_size=4", "rlp.max_thought_tokens=6",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=64", "optimizer.adam_eps=1e-4",
    "device.num_threads=1",
)
LR, STEPS = 1e-3, 3
KEYS = ("reward_mean", "reward_std", "advantage_std", "thought_len", "closed_fraction", "s_ema",
        "s_pred", "grad_norm", "lr", "tokens")
RECORD_ATOL = 2e-5  # per-thought fp32 log-probs of O(5), another reduction order


def run(tmp: Path, nproc: int, *overrides: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    return train_and_collect(tmp, nproc, "examples/configs/tiny_hybrid_cpu.yaml", *SMALL,
                             f"optimizer.lr={LR}", f"train.steps={STEPS}", *overrides)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp1")
    rows, params = run(tmp, 1)
    return rows, params, merged_records(tmp / "record")


LAYOUTS = [
    pytest.param(("parallel.tensor_model_parallel_size=2",), id="tp2"),
    # Also equal; kept out of the default suite for time (`pytest -m slow`).
    pytest.param(("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                  "train.objective=ntp", "data.ntp_seq_length=64"), id="tp2-sequence-parallel-ntp",
                 marks=pytest.mark.slow),
    pytest.param(("parallel.pipeline_model_parallel_size=2",
                  "model.hybrid_layer_pattern=M-M*|-M-"), id="pp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_match_one_rank(one_rank, tmp_path, layout):
    ref_rows, ref_params, ref_records = one_rank
    rlp = "train.objective=ntp" not in layout
    if not rlp:  # sequence parallel trains NTP only (config rule)
        ref_rows, ref_params = run(tmp_path / "ntp1", 1, "train.objective=ntp",
                                     "data.ntp_seq_length=64")
    rows, params = run(tmp_path, 2, *layout, *(("train.save_interval=1",) if rlp else ()))
    _assert_runs_equal(ref_rows, ref_params, rows, params)
    if rlp:
        assert_records_match(ref_records, merged_records(tmp_path / "record"), RECORD_ATOL)
        check_run_against_reference("examples/configs/tiny_hybrid_cpu.yaml",
                                    (*SMALL, f"optimizer.lr={LR}", f"train.steps={STEPS}"),
                                    tmp_path / "ckpt", tmp_path / "record", rows)


def _assert_runs_equal(ref_rows, ref_params, rows, params):
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3]
    keys = KEYS if rows[0]["objective"] == "rlp" else ("loss", "grad_norm", "lr", "tokens")
    for ref, got in zip(ref_rows, rows, strict=True):
        for key in keys:
            assert math.isclose(got[key], ref[key], rel_tol=1e-5, abs_tol=1e-5), (
                f"step {ref['step']} {key}: 2 ranks {got[key]} vs 1 rank {ref[key]}")
    assert any("mixer.in_proj" in k for k in ref_params) and params.keys() == ref_params.keys()
    adam_reach = LR * STEPS
    for name, value in ref_params.items():
        err = (params[name] - value).abs().max().item()
        assert err <= 1e-5 * value.abs().max().item() + 1e-4 * adam_reach, (
            f"{name}: max |diff| {err:.2e}")


@pytest.mark.slow
def test_tp2_shared_prefixes_several_positions_per_window(tmp_path):
    """Shared prefixes (the default) with 2 positions per document: the Mamba layers fork
    states at two t_k per window in the rollout, and the packed update, whose micro-batches
    (4 thought rows) split each document's 8 rows over two packed sequences, starts branches
    from them; TP=2 equals one rank."""
    extra = ("rlp.positions_per_document=2", "train.micro_batch_size=4")
    ref_rows, ref_params = run(tmp_path / "one", 1, *extra)
    rows, params = run(tmp_path / "two", 2, "parallel.tensor_model_parallel_size=2", *extra)
    _assert_runs_equal(ref_rows, ref_params, rows, params)
