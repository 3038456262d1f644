"""`routing_agreement`'s comparison where the routers see part of the model or of the
sequence (models/moe_routing.py), without processes: a sequence-parallel rank compares only
the thought tokens predicted inside its slice, and the chunks of an interleaved pipeline
stage combine per micro-batch. The multi-rank runs are tests/distributed/test_moe_layouts.py."""

from __future__ import annotations

import torch

from megatron_rlp.models import moe_routing
from megatron_rlp.models.moe_routing import UpdateAgreement, disagreement, pack_routing

B, S, E, TOPK = 3, 8, 4, 2


def _maps(layers: int, seed: int) -> list[torch.Tensor]:
    """Top-2 of 4 routing maps [S * B, E], sequence-major (row s * B + b)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        top = torch.rand(S * B, E, generator=g).topk(TOPK, -1).indices
        out.append(torch.zeros(S * B, E, dtype=torch.bool).scatter_(1, top, True))
    return out


def _rollout(maps: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """[B, K, layers, E / 8]: the maps at `index`, packed (the rollout's record, agreeing)."""
    return pack_routing(torch.stack([m.view(S, B, E)[index, torch.arange(B)[:, None]]
                                     for m in maps], 2))


def _thoughts() -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([[2, 3, 4, 5], [1, 2, 3, 0], [4, 5, 6, 7]])
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4])
    return index, mask


def test_sequence_slices_compare_their_own_tokens():
    index, mask = _thoughts()
    maps = _maps(2, 0)
    rollout = _rollout(maps, index)
    half = S // 2 * B  # two sequence-parallel ranks: positions [0, 4) and [4, 8)
    slices = [([m[:half] for m in maps], 0), ([m[half:] for m in maps], S // 2)]
    assert not disagreement(maps, index, mask, rollout).any()
    for local, start in slices:
        assert not disagreement(local, index, mask, rollout, start).any()
    # The update routes position 5 of row 2 (predicting its thought token 1) elsewhere in
    # layer 1: only the rank whose slice holds position 5 sees it.
    maps[1][5 * B + 2] = ~maps[1][5 * B + 2]
    slices = [([m[:half] for m in maps], 0), ([m[half:] for m in maps], S // 2)]
    bad = [disagreement(local, index, mask, rollout, start) for local, start in slices]
    assert not bad[0].any()
    assert bad[1].nonzero().tolist() == [[2, 1]]
    assert torch.equal(bad[0] | bad[1], disagreement(maps, index, mask, rollout))
    # A position off the mask is never counted (row 1, column 3 predicts nothing).
    maps[0][0 * B + 1] = ~maps[0][0 * B + 1]
    assert disagreement(maps, index, mask, rollout).sum() == 1


def test_pack_routing_keeps_every_expert():
    """Packing is one-to-one: each expert has its own bit, E not a multiple of 8 included."""
    for experts in (4, 8, 13, 128):
        maps = torch.rand(64, experts) < 0.3
        packed = pack_routing(maps)
        assert packed.dtype == torch.uint8 and packed.shape == (64, -(-experts // 8))
        bits = (packed[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        assert torch.equal(bits.flatten(1)[:, :experts].bool(), maps)


class _Chunk:
    def __init__(self, routers):
        self.routers = routers


def test_interleaved_chunks_combine_per_microbatch(monkeypatch):
    """Two chunks of one stage (layers 0 and 1 of the rollout's record), two micro-batches in
    schedule order: a token disagreeing in either chunk's layer disagrees."""
    monkeypatch.setattr(moe_routing, "routers", lambda model: model.routers)
    first, second = object(), object()
    chunks = [_Chunk([first]), _Chunk([second])]
    agreement = UpdateAgreement([first, second])
    index, mask = _thoughts()
    maps = _maps(2, 1)
    batch = {"index": index, "mask": mask, "rollout_routing": _rollout(maps, index)}
    for micro in range(2):
        for layer, chunk in enumerate(chunks):
            m = maps[layer].clone()
            if micro == 1 and layer == 1:
                m[3 * B + 0] = ~m[3 * B + 0]  # row 0, thought token 1, layer 1
            agreement.compare(chunk, [m], batch, 0)
    values = agreement.values()
    count = int(mask.sum())
    assert [float(v) for v in values] == [1.0, float(torch.tensor((count - 1) / count))]
