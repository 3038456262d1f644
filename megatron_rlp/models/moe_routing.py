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


class RolloutRouting:
    """Records, during `rollout.thoughts.sample_thoughts`, the routing of every thought token.

    Use as a context manager around the rollout; `sample_thoughts` calls `begin`, `prefill`
    and `decode` (its `routing=` argument); `result()` is [R, L, layers, experts] bool over
    the rollout's rows (chunks concatenated in order).
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
        """The last call's maps of its final position, [rows, layers, experts]."""
        return torch.stack([m.view(-1, rows, m.shape[-1])[-1] for m in self._maps], 1)

    def begin(self, rows: int, tokens: int) -> None:
        """A rollout chunk of `rows` thought rows of up to `tokens` tokens starts."""
        self._shape = (rows, tokens)
        self.parts.append(None)

    def _part(self, maps: Tensor) -> Tensor:
        """This chunk's [rows, tokens, layers, experts] record (made at its first write)."""
        if self.parts[-1] is None:
            self.parts[-1] = torch.zeros(*self._shape, *maps.shape[1:], dtype=torch.bool,
                                         device=maps.device)
        return self.parts[-1]

    def prefill(self, contexts: int, group_size: int) -> None:
        """After the prefill (its last position is each context's last lead token): the
        routing that predicts thought token 0 of all `group_size` thoughts of a context."""
        maps = self._stacked(contexts).repeat_interleave(group_size, 0)
        self._part(maps)[:, 0] = maps

    def decode(self, k: int, live: Tensor) -> None:
        """After the decode step that predicts thought token `k` of rows `live`."""
        maps = self._stacked(len(live))
        self._part(maps)[live, k] = maps

    def result(self) -> Tensor:
        return torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]


def agreement(update_maps: list[Tensor], index: Tensor, mask: Tensor, rollout: Tensor
              ) -> tuple[Tensor, Tensor]:
    """(agreeing, counted) thought tokens of one update micro-batch.

    Args:
        update_maps: each router's routing map of the update forward, [S * B, E] bool.
        index: [B, K] positions predicting thought tokens; mask: [B, K] bool.
        rollout: [B, K, layers, E] bool, the rollout's routing of the same tokens.
    """
    b = index.shape[0]
    got = torch.stack([m.view(-1, b, m.shape[-1]).transpose(0, 1)
                       .gather(1, index[..., None].expand(-1, -1, m.shape[-1]))
                       for m in update_maps], 2)  # [B, K, layers, E]
    same = (got == rollout.to(got.device)).flatten(2).all(-1) & mask
    return same.sum(), mask.sum()


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


def with_routing_metrics(forward_step: Callable, topk: int) -> Callable:
    """Wrap a Megatron `forward_step_func` of the RLP update (`train.rlp_step`).

    Its micro-batches gain `padding_mask` (`update_padding`; under sequence parallel this
    rank's slice of the sequence, as its routers see it); its loss function's metrics gain
    `load_metrics` (NaN on a pipeline stage without E layers) and, when the micro-batches
    carry `rollout_routing` ([B, K, layers, E], aligned with `index` / `mask`; the packed and
    the unpacked update both lay it out so), `routing_agreement`: this micro-batch's
    fraction of thought tokens routed as in the rollout.
    """

    def step(data_iterator, model):
        batch = next(data_iterator)
        padding = update_padding(batch)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1 and getattr(model.config, "sequence_parallel", False):
            width = padding.shape[1] // tp
            rank = parallel_state.get_tensor_model_parallel_rank()
            padding = padding[:, rank * width:(rank + 1) * width]
        with last_routing(model) as maps:
            output, loss_func = forward_step(iter([{**batch, "padding_mask": padding}]), model)
        nan = torch.tensor(float("nan"))
        extra = (load_metrics(maps, padding, topk) if maps else
                 {"moe_expert_load_max": nan, "moe_dropped_fraction": nan})
        if "rollout_routing" in batch:
            same, count = agreement(maps, batch["index"], batch["mask"],
                                    batch["rollout_routing"])
            extra["routing_agreement"] = same.float() / count.clamp(min=1).float()

        def loss(*args, **kwargs):
            value, metrics = loss_func(*args, **kwargs)
            return value, {**metrics, **extra}

        return output, loss

    return step
