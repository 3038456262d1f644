"""The branch-packed update of a hybrid model under Megatron's full activation recomputation
(`train.recompute_granularity=full`): layers re-run their forward during backward, and the
Mamba layers must see the packed layout there too (it rides on the tree mask, see
models/mamba/branches.py). Loss and every gradient equal the unpacked update's."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers.tiny_models import tiny_model
from test_packed_update import TOK, G, _inputs, _run

from megatron_rlp.data.batches import update_batch
from megatron_rlp.models.mamba import branches
from megatron_rlp.models.provider import unwrap_model
from megatron_rlp.packing.update import packed_update_batches
from megatron_rlp.train.rlp_update import rlp_forward_step


def test_packed_hybrid_update_with_full_recompute_equals_unpacked():
    prompts, windows, thoughts, adv = _inputs(seed=1)
    rows = len(adv)
    with tiny_model(TOK.vocab_size, "hybrid-recompute") as model:
        assert unwrap_model(model).config.recompute_granularity == "full"
        ref_loss, ref = _run(model, rlp_forward_step,
                             [update_batch(prompts, thoughts, adv, G, TOK.pad, TOK.think_start)],
                             rows)
        packed = packed_update_batches(windows, prompts, thoughts, adv, G, 0, TOK.pad,
                                       TOK.think_start, equal_width=False, rows_per_seq=2 * G)
        loss, got = _run(model, rlp_forward_step, packed, rows)
    gc.collect()
    assert not branches._LAYOUTS  # each layout left with its mask after the backward
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert ref.keys() == got.keys() and any("mixer.in_proj" in k for k in ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
