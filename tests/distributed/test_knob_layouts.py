"""The issue-12 knobs under parallel layouts (torchrun, gloo, OMP_NUM_THREADS=1): a run with a
`{context}` thought template (instruction + forced tokens before `<think>`), the KL penalty,
the NTP mix and a 3-token discounted reward (issue 26) computes what the one-rank run
computes — for 2 steps S_ema, S_pred, the loss (surrogate + beta x KL), `kl_ref`,
`ntp_loss`, the gradient norms and the final parameters. Tolerances as in test_layouts.py
(fp32 reduction order); the loss and `kl_ref` are sums of O(1e-3) terms here, compared at
1e-6 absolute.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from layout_runs import train_and_collect
from test_layouts import SMALL, assert_params_match

KNOBS = ("rlp.thought_template=Text: {context}\nThink:", "rlp.kl_coef=0.1",
         "rlp.ntp_loss_coef=0.5", "rlp.positions_per_document=2",
         "rlp.reward_tokens=3", "rlp.reward_discount=0.9",
         "model.max_sequence_length=160")  # two positions: windows up to 120 tokens
CHECKS = (("s_ema", 1e-5, 0.0), ("s_pred", 1e-5, 0.0), ("ntp_loss", 1e-5, 0.0),
          ("kl_ref", 1e-4, 1e-6), ("loss", 1e-4, 1e-6), ("grad_norm", 1e-4, 0.0))


def run(tmp: Path, nproc: int, *overrides: str):
    return train_and_collect(tmp, nproc, "examples/configs/tiny_cpu.yaml", *SMALL, *KNOBS,
                             "train.steps=2", *overrides)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run(tmp_path_factory.mktemp("one"), 1)


@pytest.mark.parametrize("layout", [
    ("parallel.pipeline_model_parallel_size=2",),
    pytest.param(("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"),
                 marks=pytest.mark.slow),
], ids=["pp2", "tp2-sequence-parallel"])
def test_knobs_match_one_rank(one_rank, tmp_path, layout):
    ref_rows, ref_params = one_rank
    rows, params = run(tmp_path, 2, *layout)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2]
    assert ref_rows[-1]["kl_ref"] > 0 and ref_rows[0]["ntp_loss"] > 0  # the knobs are on
    for a, b in zip(ref_rows, rows, strict=True):
        for key, rel, abs_ in CHECKS:
            assert math.isclose(b[key], a[key], rel_tol=rel, abs_tol=abs_), (
                f"step {a['step']} {key}: {b[key]} vs one rank {a[key]}")
    assert_params_match(ref_params, params)
