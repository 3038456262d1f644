"""Branch-packed update (megatron_rlp/packing) against the unpacked per-thought update: the
loss and every parameter gradient agree within fp32 tolerance, for whole-document packing
and for documents split over several packed sequences (micro-batches smaller than a
document), for a dense and a hybrid (Mamba) model: there every branch's Mamba layers start
from the conv/SSM states at its t_k. One-process gloo group, tiny HybridModels, synthetic
thoughts of varied lengths (1 token up to the limit)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.tiny_models import tiny_model

from megatron_rlp.config import load_config
from megatron_rlp.data.batches import build_rlp_inputs, update_batch
from megatron_rlp.data.contexts import Context
from megatron_rlp.packing.tree import WINDOW, tree_mask
from megatron_rlp.packing.update import packable, packed_update_batches, rows_per_sequence
from megatron_rlp.rollout.thoughts import ThoughtBatch
from megatron_rlp.tokenizer import ByteTokenizer
from megatron_rlp.train.rlp_update import rlp_forward_step

TOK = ByteTokenizer()
G, L, EPS = 3, 6, (0.2, 0.2)


@pytest.fixture(scope="module")
def model(request):
    with tiny_model(TOK.vocab_size, request.param) as net:
        yield net


def _inputs(seed: int = 0):
    """Two documents x 2 positions, G thoughts each; prefixes of different lengths."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (40, 30)]
    contexts = [Context(d, t, docs[d][:t], int(docs[d][t])) for d, t in
                ((0, 20), (0, 33), (1, 9), (1, 17))]
    prompts, windows = build_rlp_inputs(contexts, list(range(4)), SimpleNamespace(documents=docs),
                                        max_prefix=24, pad=TOK.pad)
    rows = len(contexts) * G
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (rows,), generator=gen)
    lengths[0], lengths[1] = 1, L
    mask = torch.arange(L)[None] < lengths[:, None]
    tokens = torch.where(mask, torch.randint(0, 256, (rows, L), generator=gen), TOK.pad)
    logp = torch.where(mask, -torch.rand(rows, L, generator=gen) * 3 - 2.5, 0.0)
    thoughts = ThoughtBatch(tokens=tokens, mask=mask, logprobs=logp, lengths=lengths,
                            closed=torch.ones(rows, dtype=torch.bool),
                            s_pred=torch.zeros(rows))
    advantages = torch.randn(rows, generator=gen)
    return prompts, windows, thoughts, advantages


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, step, mbs, rows):
    """Loss and gradients of `mbs` as Megatron's schedule sums them (loss/num_microbatches)."""
    model.zero_grad(set_to_none=True)
    it, total = iter(mbs), 0.0
    for mb in mbs:
        scale = (mb["advantages"].numel() if "branch" in mb else len(mb["tokens"])) * len(mbs)
        logits, loss_fn = step(scale / rows, TOK.vocab_size, 0.7, EPS, it, model)
        loss, _ = loss_fn(logits)
        (loss / len(mbs)).backward()
        total += float(loss.detach()) / len(mbs)
    return total, _grads(model)


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
