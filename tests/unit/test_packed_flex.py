"""FlexAttention path of the packed update (megatron_rlp/packing/flex.py) on CPU: the eager
FlexAttention operator gives the packed loss and every gradient of the explicit-mask path and
of the unpacked update (fp32 tolerance, tiny dense GQA model); the BlockMask, expanded to
tokens the way the block-sparse kernel reads it, equals the explicit tree mask; the skipped
tile fraction is > 0 on a packed batch with several branches. The compiled CUDA kernel itself
does not run here (no GPU); tools/gpu_check.py times it on one."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers.tiny_models import tiny_dense_model
from test_packed_update import TOK, G, _inputs, _run

from megatron_rlp.data.batches import update_batch
from megatron_rlp.packing import flex
from megatron_rlp.packing.tree import tree_mask
from megatron_rlp.packing.update import packed_update_batches
from megatron_rlp.train.rlp_update import rlp_forward_step


@pytest.fixture(scope="module")
def model():
    with tiny_dense_model(TOK.vocab_size) as net:
        yield net


@pytest.mark.parametrize("micro_batch_size, rows_per_seq", [(0, 6), (6, 3)])
def test_flex_loss_and_gradients_equal_mask_and_unpacked(model, micro_batch_size,
                                                         rows_per_seq):
    prompts, windows, thoughts, adv = _inputs()
    rows = len(adv)
    size = micro_batch_size or rows
    batch = update_batch(prompts, thoughts, adv, G, TOK.pad, TOK.think_start)
    mbs = [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size)]
    ref_loss, ref = _run(model, rlp_forward_step, mbs, rows)
    packed = packed_update_batches(windows, prompts, thoughts, adv, G, micro_batch_size,
                                   TOK.pad, TOK.think_start, equal_width=False,
                                   rows_per_seq=rows_per_seq)
    mask_loss, masked = _run(model, rlp_forward_step, packed, rows)
    flex_loss, got = _run(model, partial(rlp_forward_step, attention="flex"), packed, rows)
    assert flex.route_core_attention(model) == 2  # both attention layers went through flex
    assert flex_loss == pytest.approx(mask_loss, rel=1e-5, abs=1e-6)
    assert flex_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert ref.keys() == got.keys() == masked.keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(got[name], masked[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_routed_attention_is_transparent_for_megatron_masks(model):
    """After routing, the unpacked update (a boolean mask / None) is unchanged."""
    prompts, _, thoughts, adv = _inputs()
    batch = update_batch(prompts, thoughts, adv, G, TOK.pad, TOK.think_start)
    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    routed = [c.__dict__.pop("forward", None) for c in cores]  # Megatron's own forward
    before = _run(model, rlp_forward_step, [batch], len(adv))
    for core, forward in zip(cores, routed, strict=True):
        if forward is not None:
            core.forward = forward
    assert flex.route_core_attention(model) == len(cores) == 2
    after = _run(model, rlp_forward_step, [batch], len(adv))
    assert after[0] == before[0]
    for name in before[1]:
        torch.testing.assert_close(after[1][name], before[1][name], rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [8, 16])
def test_block_mask_equals_tree_mask_and_skips_blocks(block_size):
    prompts, windows, thoughts, adv = _inputs()
    mb = packed_update_batches(windows, prompts, thoughts, adv, G, 0, TOK.pad, TOK.think_start,
                               equal_width=False)[0]
    assert int(mb["branch"].max()) >= 2  # several branches per sequence
    descriptor = flex.tree_descriptors(mb["branch"], mb["lo"], mb["hi"])
    block_mask = flex.tree_block_mask(descriptor, block_size)
    attends = flex.dense_from_block_mask(block_mask)
    torch.testing.assert_close(attends, ~tree_mask(mb["branch"], mb["lo"], mb["hi"]),
                               rtol=0, atol=0)
    sparsity = flex.block_sparsity(block_mask)
    assert 0 < sparsity < 1
    assert sparsity == pytest.approx(block_mask.sparsity() / 100, abs=1e-6)  # PyTorch's count
    report = flex.packed_sparsity(mb["branch"], mb["lo"], mb["hi"], block_size)
    assert report["block"] == pytest.approx(sparsity)
    assert report["block"] <= report["pair"]  # a tile is skipped only if all its pairs are


def test_resolve_and_refusals():
    assert flex.resolve("auto", "cpu", "*-") == "split"
    assert flex.resolve("auto", "cuda", "*-") == "flex"
    assert flex.resolve("auto", "cuda", "M*") == "mask"
    assert flex.resolve("flex", "cpu", "*-") == "flex"
    with pytest.raises(ValueError, match="attention-only"):
        flex.resolve("flex", "cuda", "M*-")
    assert not flex.is_tree_descriptor(torch.ones(2, 1, 3, 3, dtype=torch.bool))
    assert flex.is_tree_descriptor(torch.zeros(2, 3, 5, dtype=torch.long))


def test_config_refuses_flex_where_it_cannot_run():
    from megatron_rlp.config import ConfigError
    from megatron_rlp.startup import load_config

    with pytest.raises(ConfigError, match=r"model.packed_attention='flex' .*no M"):
        load_config(None, ("model.packed_attention=flex", "model.hybrid_layer_pattern=M*-",
                           "model.mamba_num_groups=2"))
    assert load_config(None, ("model.packed_attention=flex",)).model.packed_attention == "flex"


def test_block_sparse_cost_model_puts_every_branch_behind_one_window():
    from megatron_rlp.config import load_config
    from megatron_rlp.packing.update import rows_per_sequence

    cfg = load_config("examples/configs/tiny_cpu.yaml", ()).model
    # Long thoughts: the dense mask splits the branches over window copies, flex does not.
    assert rows_per_sequence(cfg, 64, 64, window=221, thought=32) < 64
    assert rows_per_sequence(cfg, 64, 64, window=221, thought=32, block_sparse=True) == 64


def test_flex_survives_core_attention_recompute(model):
    """Selective recompute (Megatron's `checkpoint_core_attention`) reruns core attention in
    the backward pass, after the forward step returned: the descriptor travels as the saved
    mask argument, so the rerun is flex too (the BlockMask cache emptied in between)."""
    prompts, windows, thoughts, adv = _inputs()
    rows = len(adv)
    packed = packed_update_batches(windows, prompts, thoughts, adv, G, 0, TOK.pad,
                                   TOK.think_start, equal_width=False, rows_per_seq=6)
    ref_loss, ref = _run(model, rlp_forward_step, packed, rows)
    layers = [m for m in model.modules() if hasattr(m, "checkpoint_core_attention")]
    assert len(layers) == 2
    step = partial(rlp_forward_step, attention="flex")

    def forward_then_forget(*args, **kwargs):
        out = step(*args, **kwargs)
        flex._block_masks.clear()  # the backward's recompute must rebuild it
        return out

    try:
        for layer in layers:
            layer.checkpoint_core_attention = True
        loss, got = _run(model, forward_then_forget, packed, rows)
    finally:
        for layer in layers:
            layer.checkpoint_core_attention = False
    assert len(flex._block_masks) == 1  # rebuilt by the first recompute, reused by the next
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["mask", "flex", "split"])
def test_plugin_pads_packed_micro_batches_to_seq_length(model, attention):
    """The plugin under pipeline parallelism sends --seq-length activations: right padding a
    packed micro-batch (plugin._pad_packed_to) changes neither its loss nor its gradients."""
    from megatron_rlp.plugin import _pad_packed_to

    prompts, windows, thoughts, adv = _inputs()
    rows = len(adv)
    packed = packed_update_batches(windows, prompts, thoughts, adv, G, 6, TOK.pad,
                                   TOK.think_start, equal_width=True, rows_per_seq=3)
    width = packed[0]["tokens"].shape[1] + 37
    padded = [_pad_packed_to(mb, width, TOK.pad) for mb in packed]
    assert all(mb["tokens"].shape[1] == width and (mb["branch"][:, -37:] == -2).all()
               for mb in padded)
    step = partial(rlp_forward_step, attention=attention)
    ref_loss, ref = _run(model, step, packed, rows)
    loss, got = _run(model, step, padded, rows)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="exceeds --seq-length"):
        _pad_packed_to(packed[0], width - 40, TOK.pad)
