"""Megatron-Core on CPU with gloo: the `device: cpu` backend.

Megatron-Core is hard-wired to CUDA (`torch.cuda.current_device()`, `device="cuda"`,
`.cuda()`, the CUDA RNG tracker). `activate()` maps every one of those onto the CPU so that
the *real* Megatron code paths (TP, PP, SP, DDP, the distributed optimizer, HybridModel) run
on a laptop or a CI box. Each patch below names the Megatron call site it serves; the facts
behind them are in shared/MEGATRON_CPU.md.

Why patch functions rather than use a `TorchFunctionMode`: a mode is not active inside
`autograd.Function.backward`, where sequence parallel allocates buffers with
`device=torch.cuda.current_device()`.

The backend is process-global and only ever activated for `device.type == "cpu"`: nothing
here runs, or is imported by the training code, on GPU runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from megatron_rlp.backends.null_cuda import NullEvent, NullStream, fresh_noop

_ACTIVE = False

# Tensor factories that take a `device=` keyword (or a positional device, for `Tensor.to`).
_FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "tensor", "as_tensor", "rand", "randn",
    "randint", "randperm", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like",
    "randn_like", "eye", "linspace", "empty_strided", "tril_indices", "triu_indices",
)


def is_active() -> bool:
    return _ACTIVE


def _cpu_device(device: Any) -> Any:
    """Map `cuda`, `cuda:N`, `torch.device('cuda')` and bare ints to cpu; keep the rest."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


def _wrap_method(fn):
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(self, *args, **kwargs)

    return method


def _wrap_to(fn):
    @functools.wraps(fn)
    def to(self, *args, **kwargs):
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(self, *args, **kwargs)

    return to


def _wrap_type(fn):
    """`clip_grads`, `optimizer` and `distrib_optimizer` test `t.type() == 'torch.cuda.FloatTensor'`
    to mean "fp32 on the accelerator"; on this backend the accelerator is the CPU."""

    @functools.wraps(fn)
    def type_(self, *args, **kwargs):
        out = fn(self, *args, **kwargs)
        if not args and not kwargs and isinstance(out, str) and self.device.type == "cpu":
            return out.replace("torch.", "torch.cuda.", 1)
        return out

    return type_


def _patch_rng() -> None:
    """Route the CUDA RNG (and Megatron's tracker) to the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
        torch.set_rng_state(new_state)

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = set_rng_state
    torch.cuda.random.set_rng_state = set_rng_state
    torch.cuda.manual_seed = manual_seed
    torch.cuda.random.manual_seed = manual_seed
    # torch.manual_seed calls torch.cuda.manual_seed_all: a CPU version would recurse.
    torch.cuda.manual_seed_all = torch.cuda.random.manual_seed_all = fresh_noop()
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_devices() -> None:
    for name in _FACTORIES:
        setattr(torch, name, _wrap_factory(getattr(torch, name)))
    torch.Tensor.to = _wrap_to(torch.Tensor.to)
    # `Tensor.new_empty(..., device=torch.cuda.current_device())`: the MoE all-to-all
    # (tensor_parallel.mappings._AllToAll, expert parallelism's token dispatch).
    for name in ("new_empty", "new_zeros", "new_ones", "new_full"):
        setattr(torch.Tensor, name, _wrap_method(getattr(torch.Tensor, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _wrap_type(torch.Tensor.type)
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = fresh_noop()
    torch.cuda.synchronize = fresh_noop()
    torch.cuda.empty_cache = fresh_noop()
    torch.cuda.current_stream = lambda *a, **k: NullStream()
    torch.cuda.default_stream = lambda *a, **k: NullStream()
    torch.cuda.stream = lambda *a, **k: NullStream()
    torch.cuda.Stream = NullStream
    torch.cuda.Event = NullEvent
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0


class _SameGeneratorFilter(logging.Filter):
    """The tracker warns when the CPU RNG moves inside a CUDA-RNG fork; here both are one
    generator, so the warning is always true and says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_inference_checks() -> None:
    """Megatron's inference p2p helpers (used by pipeline-parallel rollouts) assert
    `tensor.is_cuda`; here the accelerator is the CPU."""
    from megatron.core.inference import communication_utils

    def _is_cuda(tensor: torch.Tensor) -> None:
        assert tensor is not None

    communication_utils._is_cuda = _is_cuda


def _patch_moe_dispatch() -> None:
    """Megatron's all-to-all token dispatcher (expert parallelism) turns the split sizes into
    host numpy arrays with `moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)`, which
    only converts CUDA tensors; CPU tensors stay tensors, which `all_to_all_single` rejects
    as split sizes. Here every tensor asked for as numpy becomes one."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    _patch_uneven_collectives()


def _patch_uneven_collectives() -> None:
    """With EP and TP > 1 the dispatcher gathers / reduce-scatters each rank's (unequal)
    token count over the expert TP group (`mappings._gather_along_first_dim` /
    `_reduce_scatter_along_first_dim` with split sizes), as lists of unequal tensors, which
    gloo refuses. Same results here: the gather pads every part to the largest, the
    reduce-scatter all-reduces the whole input and keeps this rank's part."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                       use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.clone().contiguous()
        dist.all_reduce(total, group=group)
        start = sum(sizes[:group.rank()])
        return total[start:start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def activate() -> None:
    """Install the CPU backend (idempotent). Call before building any Megatron object."""
    global _ACTIVE
    if _ACTIVE:
        return
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_SameGeneratorFilter())
    _patch_rng()
    _patch_devices()
    _patch_inference_checks()
    _patch_moe_dispatch()
    _ACTIVE = True
