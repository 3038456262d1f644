"""S_ema scoring projects only the target positions onto the vocabulary, with the same values
as the full-window logits (one rank, fp32 and bf16 tiny models)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.models.provider import build_model
from megatron_rlp.scoring.next_token import score_next_tokens, target_index

VOCAB = 261  # the byte tokenizer's; the model pads to 320
TINY = ("model.hybrid_layer_pattern=M*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.mamba_num_heads=4",
        "model.mamba_head_dim=16", "model.mamba_state_dim=8", "model.mamba_num_groups=2")


@pytest.fixture(scope="module")
def cfg():
    cfg = load_config(None, TINY)
    distributed.initialize(cfg)
    yield cfg
    distributed.shutdown()


def windows():
    """3 left-padded windows; 6 scored positions, several per window, rows out of order."""
    gen = torch.Generator().manual_seed(1)
    lengths = [20, 13, 17]
    width = max(lengths)
    tokens = torch.full((3, width), 0, dtype=torch.long)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = torch.randint(0, VOCAB, (n,), generator=gen)
        valid[i, width - n:] = True
    rows = torch.tensor([0, 0, 2, 1, 0, 2])
    cols = torch.tensor([5, 19, 10, 18, 12, 19])
    targets = torch.randint(0, VOCAB, (6,), generator=gen)
    return tokens, valid, rows, cols, targets


def test_target_index_lays_positions_out_per_row():
    rows, cols = torch.tensor([0, 0, 2, 1, 0, 2]), torch.tensor([5, 19, 10, 18, 12, 19])
    slots, index = target_index(rows, cols, 3)
    assert slots.tolist() == [0, 1, 0, 0, 2, 1]
    assert index.tolist() == [[5, 19, 12], [18, 0, 0], [10, 19, 0]]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scores_at_targets_equal_full_window_logits(cfg, dtype):
    cfg = load_config(None, (*TINY, f"precision.params_dtype={dtype}"))
    model = build_model(cfg, VOCAB).eval()
    tokens, valid, rows, cols, targets = windows()
    seen = []
    handle = model.output_layer.register_forward_hook(lambda m, i, out: seen.append(out[0].shape))
    try:
        got = score_next_tokens(model, tokens, valid, rows, cols, targets, VOCAB)
    finally:
        handle.remove()
    assert seen == [torch.Size([3, 3, 320])]  # [L, D, V]: 3 slots per window, not 20 columns
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        full = model(tokens, positions, padded_causal_mask(valid)).float()  # [D, W, V]
    ref = torch.log_softmax(full[rows, cols, :VOCAB], -1).gather(1, targets[:, None])[:, 0]
    assert got.dtype == torch.float32
    # Same hidden states, same projection rows: equal up to the matmul's summation order.
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
