"""The packed update's FlexAttention compiled by inductor on CPU, as a GPU run compiles it
(`packing.flex` with `compile_on_cpu`: `torch.compile` of `flex_attention` and of
`create_block_mask`, static shapes, widths padded to the 128 tile).

- The compiled forward gives the explicit-mask path's loss (tiny dense GQA model, packed
  micro-batches of several branches per sequence).
- 20 steps of varying packed widths compile once per padded width (here: once), not per step,
  and the count is what the `flex_compiles` metric reports.

Gradients do not run compiled on CPU: `flex_attention` refuses CPU inputs that need them and
inductor has no CPU lowering of its backward. The eager FlexAttention operator's gradients
are checked against the explicit-mask path in tests/unit/test_packed_flex.py; the compiled
backward (Triton) runs on a GPU only (tools/gpu_check.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers.packed_inputs import EPS, TOK, G, _inputs
from helpers.tiny_models import tiny_dense_model

from megatron_rlp.packing import flex
from megatron_rlp.packing.update import packed_update_batches
from megatron_rlp.train import loop
from megatron_rlp.train.rlp_update import rlp_forward_step


@pytest.fixture(scope="module")
def model():
    with tiny_dense_model(TOK.vocab_size) as net:
        yield net


@pytest.fixture
def compiled(monkeypatch):
    """The compiled path on CPU. Inductor's CPU FlexAttention lowering inserts a `torch.full`
    node looked up at lowering time; the CPU backend (`backends/cpu.py`, CPU runs only) has
    replaced `torch.full` by a device-mapping wrapper that inductor has no lowering for, so
    the original is put back meanwhile (the tiny model's forward passes no CUDA device)."""
    monkeypatch.setattr(flex, "compile_on_cpu", True)
    monkeypatch.setattr(torch, "full", getattr(torch.full, "__wrapped__", torch.full))


def packed(seed: int, rows_per_seq: int = 6):
    prompts, windows, thoughts, adv = _inputs(seed)
    return packed_update_batches(windows, prompts, thoughts, adv, G, 0, TOK.pad,
                                 TOK.think_start, equal_width=False,
                                 rows_per_seq=rows_per_seq), len(adv)


def loss_of(model, mbs, rows, attention: str) -> float:
    """The packed update's loss (no backward), summed over micro-batches as Megatron does."""
    it, total = iter(mbs), 0.0
    with torch.no_grad():
        for mb in mbs:
            scale = mb["advantages"].numel() * len(mbs)
            logits, loss_fn = rlp_forward_step(scale / rows, TOK.vocab_size, 0.7, EPS, it,
                                               model, attention=attention)
            total += float(loss_fn(logits)[0]) / len(mbs)
    return total


def test_compiled_flex_equals_explicit_mask_and_compiles_once_per_width(model, compiled):
    before = flex.compile_count()
    widths, losses = set(), []
    for step in range(20):
        mbs, rows = packed(seed=step)
        widths.add(tuple(mb["tokens"].shape for mb in mbs))
        got = loss_of(model, mbs, rows, "flex")
        if step < 3:  # the explicit-mask path (Megatron's attention with the dense tree mask)
            want = loss_of(model, mbs, rows, "mask")
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        losses.append(got)
    compiles = flex.compile_count() - before
    shapes = {tuple((s[0], -(-s[1] // flex.BLOCK_SIZE)) for s in w) for w in widths}
    assert len(widths) > 3 and len(shapes) == 1  # widths vary, all pad to one tile count
    # flex_attention and create_block_mask each compile once for the padded width.
    assert 1 <= compiles <= 2, f"{compiles} compilations over 20 steps of {len(widths)} widths"
    assert loop.kernel_metrics()["flex_compiles"] == flex.compile_count()
