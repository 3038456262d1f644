"""Split tree attention of the packed update (megatron_rlp/packing/split_attention.py), the
CPU default: it computes only the pairs the tree reads, and gives the dense tree-masked
attention's outputs and input gradients (against a float64 reference), and the packed
update's loss and every parameter gradient of the explicit-mask path and of the unpacked
update, dense and hybrid (Mamba) models, with activation recomputation too (fp32 tolerance).
Synthetic inputs of tests/helpers/packed_inputs.py: 2 documents x 2 positions (different
prefix ends), G=3 thoughts of 1 to 6 tokens, windows of different lengths."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers.packed_inputs import TOK, G, _inputs, _run
from helpers.tiny_models import tiny_model

from megatron_rlp.data.batches import update_batch
from megatron_rlp.packing import flex, split_attention
from megatron_rlp.packing.split_attention import SplitLayout, split_tree_attention
from megatron_rlp.packing.tree import PAD, WINDOW, tree_mask
from megatron_rlp.packing.update import packed_update_batches
from megatron_rlp.train.rlp_update import rlp_forward_step


def _packed(micro_batch_size: int, rows_per_seq: int, equal_width: bool = False):
    prompts, windows, thoughts, adv = _inputs()
    return packed_update_batches(windows, prompts, thoughts, adv, G, micro_batch_size, TOK.pad,
                                 TOK.think_start, equal_width=equal_width,
                                 rows_per_seq=rows_per_seq)


def _dense_reference(q, k, v, mask, scale):
    """float64 tree-masked attention, Megatron's layout: [S, N, np, hn] -> [S, N, np*hn]."""
    s, n, heads, hn = q.shape
    rep = heads // k.shape[2]
    qq, kk, vv = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))
    kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
    scores = (qq @ kk.transpose(-1, -2) * scale).masked_fill(mask, float("-inf"))
    out = torch.softmax(scores, -1).nan_to_num() @ vv  # padding rows read nothing
    return out.permute(2, 0, 1, 3).reshape(s, n, heads * hn)


@pytest.mark.parametrize("micro_batch_size, rows_per_seq", [(0, 6), (0, 2), (6, 3)])
def test_split_attention_equals_dense_tree_attention(micro_batch_size, rows_per_seq):
    for mb in _packed(micro_batch_size, rows_per_seq, equal_width=True):
        branch, lo, hi = mb["branch"], mb["lo"], mb["hi"]
        n, s = branch.shape
        layout = SplitLayout.from_packed(branch, lo, hi)
        assert layout.branches == rows_per_seq and layout.window < s
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(s, n, 4, 8, generator=gen, requires_grad=True)  # GQA: 4 heads, 2 groups
        k = torch.randn(s, n, 2, 8, generator=gen, requires_grad=True)
        v = torch.randn(s, n, 2, 8, generator=gen, requires_grad=True)
        real = (branch != PAD).t()[:, :, None]  # [S, N, 1]: padding outputs are never read
        upstream = torch.randn(s, n, 32, generator=gen) * real
        got = split_tree_attention(q, k, v, layout, 0.3)
        got.backward(upstream)
        grads = [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
        ref = _dense_reference(q, k, v, tree_mask(branch, lo, hi), 0.3)
        ref.backward(upstream.double())
        torch.testing.assert_close(got * real, (ref * real).float(), rtol=1e-5, atol=1e-5)
        for name, g, x in zip("qkv", grads, (q, k, v), strict=True):
            torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-5, msg=name)
        # The window is the longest window, a branch slot row as long as the longest branch.
        assert layout.window == int((branch == WINDOW).sum(1).max())
        assert layout.length == max(int((row == j).sum()) for row in branch
                                    for j in range(rows_per_seq))


def test_layout_refuses_what_is_not_a_packed_tree():
    mb = _packed(0, 6)[0]
    branch, lo, hi = mb["branch"], mb["lo"], mb["hi"]
    bad_lo = lo.clone()
    bad_lo[0, 1] = 1  # a window token that does not read from column 0
    with pytest.raises(ValueError, match="causal from column 0"):
        SplitLayout.from_packed(branch, bad_lo, hi)
    split = branch.clone()
    j = next(j for j in range(6) if int((branch[0] == j).sum()) >= 3)
    first = int((branch[0] == j).nonzero()[0])
    split[0, first + 1] = PAD  # branch j interrupted
    with pytest.raises(ValueError, match="contiguous branches"):
        SplitLayout.from_packed(split, lo, hi)


@pytest.fixture(scope="module", params=["dense", "hybrid"])
def model(request):
    with tiny_model(TOK.vocab_size, request.param) as net:
        yield net


@pytest.mark.parametrize("micro_batch_size, rows_per_seq", [(0, 6), (6, 3)])
def test_split_loss_and_gradients_equal_mask_and_unpacked(model, micro_batch_size,
                                                          rows_per_seq):
    prompts, windows, thoughts, adv = _inputs()
    rows = len(adv)
    size = micro_batch_size or rows
    batch = update_batch(prompts, thoughts, adv, G, TOK.pad, TOK.think_start)
    mbs = [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size)]
    ref_loss, ref = _run(model, rlp_forward_step, mbs, rows)
    packed = _packed(micro_batch_size, rows_per_seq)
    mask_loss, masked = _run(model, rlp_forward_step, packed, rows)
    loss, got = _run(model, partial(rlp_forward_step, attention="split"), packed, rows)
    assert split_attention.route_core_attention(model) >= 1  # every attention layer routed
    assert loss == pytest.approx(mask_loss, rel=1e-5, abs=1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert ref.keys() == got.keys() == masked.keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(got[name], masked[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_survives_core_attention_recompute(model):
    """Selective recompute reruns core attention in the backward on a detached copy of the
    mask: it shares the mask's storage, so the rerun finds the layout and splits too."""
    packed = _packed(0, 6)
    rows = packed[0]["advantages"].numel()
    ref_loss, ref = _run(model, rlp_forward_step, packed, rows)
    layers = [m for m in model.modules() if hasattr(m, "checkpoint_core_attention")]
    assert layers
    calls = []
    forward = split_attention.split_tree_attention

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    try:
        split_attention.split_tree_attention = counted
        for layer in layers:
            layer.checkpoint_core_attention = True
        loss, got = _run(model, partial(rlp_forward_step, attention="split"), packed, rows)
    finally:
        split_attention.split_tree_attention = forward
        for layer in layers:
            layer.checkpoint_core_attention = False
    assert len(calls) == 2 * len(layers)  # forward, then the backward's recompute
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_routed_attention_is_transparent_for_other_masks(model):
    """After routing, the unpacked update (Megatron's causal / padding masks) is unchanged."""
    prompts, _, thoughts, adv = _inputs()
    batch = update_batch(prompts, thoughts, adv, G, TOK.pad, TOK.think_start)
    split_attention.route_core_attention(model)
    before = _run(model, rlp_forward_step, [batch], len(adv))
    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    original = [c.__dict__.pop("forward") for c in cores]
    try:
        after = _run(model, rlp_forward_step, [batch], len(adv))
    finally:
        for core, fwd in zip(cores, original, strict=True):
            core.forward = fwd
    assert after[0] == before[0]
    for name in before[1]:
        torch.testing.assert_close(after[1][name], before[1][name], rtol=0, atol=0)


def test_auto_is_split_on_cpu():
    assert flex.resolve("auto", "cpu", "*-") == "split"
    assert flex.resolve("auto", "cpu", "M*-") == "split"
    assert flex.resolve("split", "cuda", "*-") == "split"
    from megatron_rlp.startup import load_config

    assert load_config(None, ("model.packed_attention=split",)).model.packed_attention == "split"


def test_what_split_does_not_do_takes_megatrons_dense_path(model):
    """Attention dropout in training (Megatron-LM's default 0.1 through the plugin): the
    routed core attention keeps Megatron's path, which applies the same tree mask."""
    packed = _packed(0, 6)
    rows = packed[0]["advantages"].numel()
    calls = []
    forward = split_attention.split_tree_attention
    config = next(m.core_attention.config for m in model.modules()
                  if hasattr(m, "core_attention"))
    try:
        split_attention.split_tree_attention = lambda *a, **k: calls.append(1) or forward(*a,
                                                                                         **k)
        _run(model, partial(rlp_forward_step, attention="split"), packed, rows)
        assert calls  # split by default
        calls.clear()
        config.attention_dropout = 0.1
        loss, grads = _run(model, partial(rlp_forward_step, attention="split"), packed, rows)
    finally:
        config.attention_dropout = 0.0
        split_attention.split_tree_attention = forward
    assert not calls and loss == loss and grads  # Megatron's dense path ran, finite loss

