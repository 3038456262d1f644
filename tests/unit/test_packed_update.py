"""Branch-packed update (megatron_rlp/packing) against the unpacked per-thought update: the
loss and every parameter gradient agree within fp32 tolerance, for whole-document packing
and for documents split over several packed sequences (micro-batches smaller than a
document), for a dense and a hybrid (Mamba) model: there every branch's Mamba layers start
from the conv/SSM states at its t_k. One-process gloo group, tiny HybridModels, synthetic
thoughts of varied lengths (1 token up to the limit)."""

from __future__ import annotations

import pytest
import torch
from helpers.packed_inputs import EPS, TOK, G, L, _grads, _inputs, _run  # noqa: F401 - shared
from helpers.tiny_models import tiny_model

from megatron_rlp.config import load_config
from megatron_rlp.data.batches import update_batch
from megatron_rlp.packing.tree import WINDOW, tree_mask
from megatron_rlp.packing.update import packable, packed_update_batches, rows_per_sequence
from megatron_rlp.train.rlp_update import rlp_forward_step


@pytest.fixture(scope="module")
def model(request):
    with tiny_model(TOK.vocab_size, request.param) as net:
        yield net


LAYOUTS = [(0, 6), (0, 2), (6, 3), (3, 3), (1, 1)]  # (micro_batch_size, rows_per_seq)
# One branch per sequence (1, 1) is the unpacked layout; for the hybrid it adds 12 micro-batches
# of time and no new case over (3, 3) (each document split over sequences).
CASES = [(kind, *layout) for kind in ("dense", "hybrid") for layout in LAYOUTS
         if (kind, layout) != ("hybrid", (1, 1))]


@pytest.mark.parametrize("model, micro_batch_size, rows_per_seq", CASES, indirect=["model"])
def test_packed_loss_and_gradients_equal_unpacked(model, micro_batch_size, rows_per_seq):
    prompts, windows, thoughts, adv = _inputs()
    rows = len(adv)
    assert packable("M*-M-", 2 * G, rows, micro_batch_size)
    batch = update_batch(prompts, thoughts, adv, G, TOK.pad, TOK.think_start)
    mbs = [{k: v[i:i + (micro_batch_size or rows)] for k, v in batch.items()}
           for i in range(0, rows, micro_batch_size or rows)]
    ref_loss, ref = _run(model, rlp_forward_step, mbs, rows)
    packed = packed_update_batches(windows, prompts, thoughts, adv, G, micro_batch_size,
                                   TOK.pad, TOK.think_start, equal_width=micro_batch_size == 3,
                                   rows_per_seq=rows_per_seq)
    assert len(packed) == len(mbs)
    loss, got = _run(model, rlp_forward_step, packed, rows)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert ref.keys() == got.keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Packing saves work: whole documents use fewer token columns than the unpacked rows.
    assert packed[0]["advantages"].shape[1] == rows_per_seq
    if micro_batch_size == 0:
        assert packed[0]["tokens"].numel() < batch["tokens"].numel()


def test_tree_mask_reads_prefix_and_own_branch_only():
    prompts, windows, thoughts, adv = _inputs()
    mb = packed_update_batches(windows, prompts, thoughts, adv, G, 0, TOK.pad, TOK.think_start,
                               equal_width=False)[0]
    mask = tree_mask(mb["branch"], mb["lo"], mb["hi"])[:, 0]
    for s in range(mask.shape[0]):
        br, lo, hi = mb["branch"][s], mb["lo"][s], mb["hi"][s]
        for i in range(mask.shape[1]):
            sees = (~mask[s, i]).nonzero().flatten().tolist()
            if br[i] == WINDOW:
                assert sees == list(range(i + 1))
            elif br[i] >= 0:
                own = [j for j in range(i + 1) if br[j] == br[i]]
                assert sees == list(range(int(lo[i]), int(hi[i]))) + own
            else:
                assert sees == []


def test_rows_per_sequence_trades_window_copies_for_masked_attention():
    cfg = load_config("examples/configs/tiny_cpu.yaml", ()).model
    # Short thoughts after a long window: everything behind one copy of the window.
    assert rows_per_sequence(cfg, 64, 64, window=2048, thought=4) == 64
    # Long thoughts: the masked branch-to-branch attention costs more than window copies.
    k = rows_per_sequence(cfg, 64, 64, window=221, thought=32)
    assert 1 < k < 64 and 64 % k == 0
    hybrid = load_config("examples/configs/tiny_hybrid_cpu.yaml", ()).model  # Mamba weights
    assert rows_per_sequence(hybrid, 64, 64, window=2048, thought=4) == 64
    assert 1 < rows_per_sequence(hybrid, 64, 64, window=221, thought=32) < 64


def test_packable_refuses_misaligned_micro_batches_only():
    assert packable("M-*-", 6, 12, 0)
    assert packable("*-", 6, 12, 12) and packable("*-", 6, 12, 2)
    assert not packable("*-", 6, 12, 4)
