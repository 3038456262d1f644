"""Routing agreement: do the update's routers pick the experts the rollout's picked?

RL on MoE models has a failure of its own: routing in the rollout differs from routing in
the update, so the thoughts were sampled by a different policy than the one trained
(Megatron-LM's `moe/router_replay.py` exists for it). Here rollouts run in the training
engine, with no token dropping (config refuses a capacity factor with RLP) and a
deterministic top-k over per-token scores, so the routing of a token cannot depend on the
other tokens of its batch; the only difference left is the numerics of a KV-cache decode
step against a full-sequence forward. This module measures it.

A thought token k is predicted from the hidden state at the position before it (the last
lead token for k = 0, thought token k - 1 after), so "its" routing, per MoE layer, is the
top-k expert set chosen at that position: in the rollout at the prefill (k = 0) or at the
decode step that fed token k - 1, in the update at `batch["index"]`. `routing_agreement` is
the fraction of thought tokens whose expert sets agree in every MoE layer.

Every layout measures it where the routers are. Each pipeline stage records its own routers
in the rollout (every stage runs the decode loop) and compares them in the update's forward
step, which Megatron's schedules call on every stage (the loss, on the last stage only, sees
that stage's routers alone); under sequence parallel a rank's routers see one slice of each
sequence and compare the thought tokens predicted inside it (the rollout runs with sequence
parallel off, so every rank recorded every token). A token's disagreement is then OR-ed over
the model-parallel group (TP x PP): it agrees iff it agrees in every MoE layer of every stage
(`UpdateAgreement`).

Why not Megatron's `RouterReplay` to record: it keeps only the last call's indices per
router and registers every router of every model built (policy, teacher, reference) in one
global list; a forward hook on this model's own routers records each decode step. Replay
is not needed while agreement is 1.0 (tests/e2e/test_rlp_moe.py checks it in fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from torch import Tensor


def routers(model: torch.nn.Module) -> list[TopKRouter]:
    """This model's (stage's) MoE routers, in layer order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


@contextmanager
def last_routing(model: torch.nn.Module):
    """Yield a list that holds, after each forward, every router's last routing map
    ([tokens, experts] bool, tokens sequence-major: row s * B + b)."""
    maps: list[Tensor | None] = [None] * len(routers(model))

    def hook(i, _module, _inputs, output):
        maps[i] = output[1].detach()

    handles = [r.register_forward_hook(partial(hook, i)) for i, r in enumerate(routers(model))]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def pack_routing(maps: Tensor) -> Tensor:
    """[..., E] bool routing maps -> [..., ceil(E / 8)] uint8, expert e as bit e % 8 of byte
    e // 8: the rollout's record kept 8x smaller (a rank of the 30B-A3B recipes records
    256 rows x 2048 thought tokens x 24 MoE layers: 1.5 GiB as bool maps of 128 experts,
    0.19 GiB packed)."""
    pad = -maps.shape[-1] % 8
    if pad:
        maps = torch.cat([maps, maps.new_zeros(*maps.shape[:-1], pad)], -1)
    bits = maps.reshape(*maps.shape[:-1], -1, 8).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=maps.device)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


class RolloutRouting:
    """Records, during `rollout.thoughts.sample_thoughts`, the routing of every thought token.

    Use as a context manager around the rollout; `sample_thoughts` calls `begin`, `prefill`
    and `decode` (its `routing=` argument); `result()` is [R, L, layers, ceil(E / 8)] uint8
    over the rollout's rows (chunks concatenated in order): each thought token's routing map
    in every MoE layer of this rank, `pack_routing`-ed.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.parts: list[Tensor] = []
        self._maps: list | None = None
        self._ctx = None
        self._shape = (0, 0)

    def __enter__(self) -> RolloutRouting:
        self._ctx = last_routing(self.model)
        self._maps = self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def _stacked(self, rows: int) -> Tensor:
        """The last call's maps of its final position, packed: [rows, layers, E / 8]."""
        return pack_routing(torch.stack([m.view(-1, rows, m.shape[-1])[-1]
                                         for m in self._maps], 1))

    def begin(self, rows: int, tokens: int) -> None:
        """A rollout chunk of `rows` thought rows of up to `tokens` tokens starts (a
        pipeline stage without MoE layers records nothing)."""
        self._shape = (rows, tokens)
        if self._maps:
            self.parts.append(None)

    def _part(self, maps: Tensor) -> Tensor:
        """This chunk's [rows, tokens, layers, E / 8] record (made at its first write)."""
        if self.parts[-1] is None:
            self.parts[-1] = torch.zeros(*self._shape, *maps.shape[1:], dtype=torch.uint8,
                                         device=maps.device)
        return self.parts[-1]

    def prefill(self, contexts: int, group_size: int) -> None:
        """After the prefill (its last position is each context's last lead token): the
        routing that predicts thought token 0 of all `group_size` thoughts of a context."""
        if not self._maps:
            return
        maps = self._stacked(contexts).repeat_interleave(group_size, 0)
        self._part(maps)[:, 0] = maps

    def decode(self, k: int, live: Tensor) -> None:
        """After the decode step that predicts thought token `k` of rows `live`."""
        if not self._maps:
            return
        maps = self._stacked(len(live))
        self._part(maps)[live, k] = maps

    def result(self) -> Tensor | None:
        """[R, L, layers, E / 8] uint8, this rank's routers; None on a stage without them."""
        if not self.parts:
            return None
        return torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]


def disagreement(update_maps: list[Tensor], index: Tensor, mask: Tensor, rollout: Tensor,
                 start: int = 0) -> Tensor:
    """[B, K] bool: the thought tokens of one update micro-batch, predicted inside this rank's
    slice of the sequence, whose top-k experts differ from the rollout's in some layer.

    Args:
        update_maps: each router's routing map of the update forward, [S' * B, E] bool,
            sequence-major over this rank's positions [start, start + S') (S' = S without
            sequence parallel, S / TP with it).
        index: [B, K] positions (of the whole sequence) predicting thought tokens;
            mask: [B, K] bool.
        rollout: [B, K, layers, E / 8] uint8, the rollout's routing of the same tokens
            (`pack_routing`), the same layers as `update_maps`.
    """
    b = index.shape[0]
    width = update_maps[0].shape[0] // b
    local = index - start
    inside = (local >= 0) & (local < width)
    at = local.clamp(0, width - 1)[..., None]
    got = torch.stack([m.view(width, b, m.shape[-1]).transpose(0, 1)
                       .gather(1, at.expand(-1, -1, m.shape[-1]))
                       for m in update_maps], 2)  # [B, K, layers, E]
    differ = (pack_routing(got) != rollout.to(got.device)).flatten(2).any(-1)
    return differ & inside & mask


class UpdateAgreement:
    """`routing_agreement` of one update, measured on every stage and rank that routes.

    `with_routing_metrics` calls `compare` after each micro-batch's forward on this rank
    (each model chunk of an interleaved pipeline once per micro-batch, in order); `values`,
    after the schedule, combines the ranks. Every rank of the model-parallel group must call
    `values` (one all-reduce).

    Args:
        rollout_routers: the routers `RolloutRouting` recorded, in its order
            (`routers(policy)`: every chunk of this rank), so a chunk's routers find their
            layers in `rollout_routing`.
    """

    def __init__(self, rollout_routers: list[TopKRouter]):
        self.layer = {id(r): i for i, r in enumerate(rollout_routers)}
        self._calls: dict[int, int] = {}   # model chunk -> micro-batches compared
        self._bad: dict[int, Tensor] = {}  # micro-batch -> [B, K] bool, disagreeing tokens
        self._count: dict[int, Tensor] = {}  # micro-batch -> thought tokens

    def compare(self, model: torch.nn.Module, maps: list[Tensor], batch: dict[str, Tensor],
                start: int) -> None:
        """Record the micro-batch's disagreeing tokens on `model`'s routers, whose `maps`
        cover the sequence positions from `start` (`disagreement`)."""
        j = self._calls.get(id(model), 0)
        self._calls[id(model)] = j + 1
        mask = batch["mask"]
        bad = torch.zeros_like(mask)
        if maps:
            layers = [self.layer[id(r)] for r in routers(model)]
            bad = disagreement(maps, batch["index"], mask,
                               batch["rollout_routing"][:, :, layers], start)
        self._bad[j] = self._bad[j] | bad if j in self._bad else bad
        self._count[j] = mask.sum()

    def values(self) -> list[Tensor]:
        """Per micro-batch, the fraction of its thought tokens that agree in every MoE layer
        of every stage: a token's disagreement is OR-ed (all-reduce MAX) over the
        model-parallel group, whose ranks hold the same micro-batches."""
        steps = sorted(self._bad)
        if not steps:
            return []
        flat = torch.cat([self._bad[j].flatten() for j in steps]).to(torch.int32)
        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_model_parallel_group()
            if dist.get_world_size(group) > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
        bad = flat.split([self._bad[j].numel() for j in steps])
        return [(self._count[j] - b.sum()).float() / self._count[j].clamp(min=1).float()
                for j, b in zip(steps, bad, strict=True)]


def load_metrics(maps: list[Tensor], padding: Tensor, topk: int) -> dict[str, Tensor]:
    """Expert load and dropped assignments over one update micro-batch's real tokens.

    Args:
        maps: each router's routing map [S * B, E] (sequence-major), this rank's tokens.
        padding: [B, S] bool, True on padding (the `padding_mask` the routers were given).

    Returns:
        moe_expert_load_max: max / mean tokens per expert, averaged over MoE layers (1.0 =
            perfectly balanced); moe_dropped_fraction: the fraction of (token, top-k slot)
            assignments a capacity factor dropped (0 without one).
    """
    valid = ~padding.transpose(0, 1).reshape(-1)  # [S * B], the maps' token order
    load = torch.stack([m[valid].sum(0).float() for m in maps])  # [layers, E]
    ratio = load.max(1).values / load.mean(1).clamp(min=1e-9)
    slots = valid.sum() * topk * len(maps)
    return {"moe_expert_load_max": ratio.mean(),
            "moe_dropped_fraction": 1.0 - load.sum() / slots.clamp(min=1)}


def update_padding(batch: dict[str, Tensor]) -> Tensor:
    """[B, S] bool, True on the padding of an update micro-batch: Megatron's MoE
    `padding_mask`, which keeps padding tokens out of the aux / z losses and the expert-bias
    token counts (they are still routed; with no token dropping that changes no real token).
    A packed micro-batch marks padding `branch == -2` (packing.tree); an unpacked row is
    `prefix lead thought` from column 0, right-padded after its last thought token."""
    if "branch" in batch:
        return batch["branch"] == -2
    index, mask, tokens = batch["index"], batch["mask"], batch["tokens"]
    last = torch.where(mask, index, 0).max(1).values + 1  # the last thought token's column
    return torch.arange(tokens.shape[1], device=tokens.device)[None] > last[:, None]


def with_routing_metrics(forward_step: Callable, topk: int,
                         agreement: UpdateAgreement | None = None) -> Callable:
    """Wrap a Megatron `forward_step_func` of the RLP update (`train.rlp_step`).

    Its micro-batches gain `padding_mask` (`update_padding`; under sequence parallel this
    rank's slice of the sequence, as its routers see it); its loss function's metrics gain
    `load_metrics` (NaN on a pipeline stage without E layers). With `agreement`, each
    forward, on every pipeline stage, compares this stage's routing with the micro-batch's
    `rollout_routing` ([B, K, layers, E / 8], aligned with `index` / `mask`; the packed and the
    unpacked update both lay it out so) into `agreement` (`UpdateAgreement.values()` after
    the schedule gives `routing_agreement`).
    """

    def step(data_iterator, model):
        batch = next(data_iterator)
        padding = update_padding(batch)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        start = 0
        if tp > 1 and getattr(model.config, "sequence_parallel", False):
            width = padding.shape[1] // tp
            start = parallel_state.get_tensor_model_parallel_rank() * width
            padding = padding[:, start:start + width]
        with last_routing(model) as maps:
            output, loss_func = forward_step(iter([{**batch, "padding_mask": padding}]), model)
        nan = torch.tensor(float("nan"))
        extra = (load_metrics(maps, padding, topk) if maps else
                 {"moe_expert_load_max": nan, "moe_dropped_fraction": nan})
        if agreement is not None:
            agreement.compare(model, maps, batch, start)

        def loss(*args, **kwargs):
            value, metrics = loss_func(*args, **kwargs)
            return value, {**metrics, **extra}

        return output, loss

    return step
