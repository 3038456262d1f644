"""Mixture-of-experts rules for a simulated step (`tools/simulate_gpu.py`, MoE recipes).

Megatron's MoE layer routes each token to its router's top-k experts and sizes every
buffer after that from the token counts per expert: the dispatcher's all-to-all splits
(`MoEAlltoAllTokenDispatcher.preprocess`), the sort by local expert (`sort_chunks_by_idxs`)
and the grouped expert GEMMs. Those counts come from the router's choice, a model output,
and from an all-gather of every rank's counts over the expert-parallel group; on fake
tensors over a fake process group neither has values (`simulated_values.HostValues` reads
small unknown integers as zeros, and the split sizes then no longer sum to the rows). Two
rules give them values. Nothing here is imported by the package.

1. **The router's choice** (`routing`): the top-k routing map of every MoE layer
   (`moe_utils.topk_routing_with_score_function`, as `TopKRouter.routing` calls it) gets a
   host shadow, one of:
   - `even` (the default): token t picks experts (t*k .. t*k+k-1) mod E, so every expert
     gets T*k/E tokens (+-1). This is the balance that Megatron's load-balancing loss
     (`moe_aux_loss_coeff`) and the sigmoid router's expert bias aim at, and what the
     memory estimate assumes (`train/memory.py` `moe_bytes`: each rank's experts receive the
     top-k copies of as many tokens as the rank sends, T*k rows).
   - `worst`: every token picks k of the simulated rank's own experts (the first k of
     `local_expert_indices`), and, as every rank is simulated as this one (rule 2), every
     rank of the expert-parallel group sends all its copies here: the rank receives
     EP x T*k rows, the bound of a dropless layer (no capacity factor) whose router has
     collapsed onto one rank's experts. No trained router is that skewed; it bounds
     what an unbalanced start could cost.
   The probabilities keep their fake values (floats are never shadowed); only which
   entries are non-zero, and so every shape downstream, follows the rule. The dispatcher's
   device-to-host copies of the counts as numpy arrays (`moe_utils.maybe_move_tensor_to_cpu
   (as_numpy=True)`; fake tensors have no `.numpy()`) hand the shadow's values, as the
   copy would on a GPU.

2. **Collectives of host-shadowed values** (`collective_values`): the fake process group
   moves no data, so an all-gather's output has no values, nor has an all-to-all's. Every
   rank is simulated as this one (the SPMD symmetry the simulation rests on), so
   - an all-gather of a shadowed tensor is the local value repeated over the group
     (`c10d._allgather_base_`, `c10d.allgather_`, `_c10d_functional.all_gather_into_tensor`),
   - an all-to-all of one (`c10d.alltoall_base_`, equal or given splits) hands every peer's
     chunk addressed to this rank, which is this rank's own chunk for its position:
     chunk `rank` of the input, repeated.
   Megatron's dispatcher gathers the tokens per expert this way (`gather_from_sequence_
   parallel_region` over the TP x EP group); with rule 1 `even` every rank then receives
   T*k rows, with `worst` EP x T*k.

Why not run the router for real: its input is an activation (bf16, no values here), and
the memory the layer takes depends on the counts alone, which these rules fix.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

ROUTINGS = ("even", "worst")


def even_routing_map(tokens: int, experts: int, topk: int) -> torch.Tensor:
    """[tokens, experts] bool: token t picks experts (t*topk + j) mod experts, j < topk;
    each expert gets tokens*topk/experts of them (+-1), each token topk distinct ones."""
    picks = (torch.arange(tokens).unsqueeze(1) * topk + torch.arange(topk)) % experts
    return torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, picks, True)


def worst_routing_map(tokens: int, experts: int, topk: int, local: list[int]) -> torch.Tensor:
    """[tokens, experts] bool: every token picks the first `topk` of the `local` experts
    (this rank's); with fewer local experts than topk, those and then the next ones."""
    order = [*local, *(e for e in range(experts) if e not in local)][:topk]
    routing = torch.zeros(tokens, experts, dtype=torch.bool)
    routing[:, order] = True
    return routing


def _rank_experts(router) -> list[int]:
    from megatron.core import parallel_state

    experts = router.config.num_moe_experts
    ep = parallel_state.get_expert_model_parallel_world_size()
    rank = parallel_state.get_expert_model_parallel_rank()
    per_rank = experts // ep
    return list(range(rank * per_rank, (rank + 1) * per_rank))


@contextlib.contextmanager
def routing_rule(values, rule: str = "even"):
    """Inside: every MoE router's routing map gets `rule`'s host shadow in `values` (a
    `simulated_values.HostValues`), so token counts, splits and expert batches follow it."""
    if rule not in ROUTINGS:
        raise ValueError(f"routing rule {rule!r}: one of {ROUTINGS}")
    from megatron.core.transformer.moe import router

    original = router.topk_routing_with_score_function
    current = {"router": None}

    def topk_routing(logits, topk, *args, **kwargs):
        probs, routing_map = original(logits, topk, *args, **kwargs)
        tokens, experts = routing_map.shape
        if rule == "even":
            real = even_routing_map(tokens, experts, topk)
        else:
            real = worst_routing_map(tokens, experts, topk, _rank_experts(current["router"]))
        values.remember(routing_map, real)
        return probs, routing_map

    routing = router.TopKRouter.routing

    def routing_with_self(self, *args, **kwargs):
        current["router"] = self
        return routing(self, *args, **kwargs)

    from megatron.core.transformer.moe import token_dispatcher

    to_host = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        host = to_host(tensor, as_numpy=False, record_stream=record_stream)
        if not as_numpy or not isinstance(host, torch.Tensor):
            return host
        real = values.value(host)  # fake tensors have no `.numpy()`: the copy's values
        if real is None:
            from simulated_values import UnknownValue, caller_site

            raise UnknownValue(f"model-dependent {host.dtype} copied to the host at "
                               f"{caller_site()}")
        return real.numpy()

    with mock.patch.object(router, "topk_routing_with_score_function", topk_routing), \
            mock.patch.object(router.TopKRouter, "routing", routing_with_self), \
            mock.patch.object(token_dispatcher, "maybe_move_tensor_to_cpu",
                              maybe_move_tensor_to_cpu):
        yield


def collective_values(func, args: tuple, out, value_of) -> list:
    """(fake output, real value) pairs for a collective `func` (its `args`, its result
    `out`) of shadowed inputs, by rule 2 of the module docstring; [] for another collective
    or an input without a value. `value_of(t)`: the real value of `t` or None
    (`HostValues.value`)."""
    name = func._schema.name.split("::")[-1]
    if name == "_allgather_base_":  # (output, input, group, async_op, timeout)
        return _repeated(args[0], value_of(args[1]))
    if name == "allgather_":  # ([[output per rank]], [input], group, ...): one tensor
        real = value_of(args[1][0]) if len(args[1]) == 1 else None
        return [p for o in args[0][0] for p in _repeated(o, real)]
    if name == "all_gather_into_tensor":  # functional: (input, group_size, group_name)
        return _repeated(out, value_of(args[0]))
    if name == "alltoall_base_":  # (output, input, group, output_splits, input_splits, ..)
        return _own_chunk(args[0], value_of(args[1]), args[2], args[3], args[4])
    return []


def _repeated(out, real) -> list:
    """`out` holds `real` repeated along the first dimension (every rank's is the same)."""
    if real is None or real.numel() == 0 or out.numel() % real.numel():
        return []
    times = out.numel() // real.numel()
    with unset_fake_temporarily():
        return [(out, real.reshape(-1).repeat(times).reshape(out.shape).clone())]


def _own_chunk(out, real, group, output_splits, input_splits) -> list:
    """All-to-all: every peer sends this rank what this rank sends the peer at its own
    position, chunk `rank` of the input; `out` holds it once per peer."""
    if real is None:
        return []
    if isinstance(group, torch.ScriptObject):  # the op's boxed process group
        group = torch.distributed.ProcessGroup.unbox(group)
    size, rank = group.size(), group.rank()
    with unset_fake_temporarily():
        splits = list(input_splits) or [real.shape[0] // size] * size
        mine = torch.split(real, splits, dim=0)[rank]
        received = list(output_splits) or [out.shape[0] // size] * size
        if any(n != mine.shape[0] for n in received):
            return []  # the splits say peers send other counts than this chunk's: unknown
        return [(out, torch.cat([mine] * size).reshape(out.shape))]
