"""The CUDA runtime answers a simulated GPU run needs, for `tools/simulate_gpu.py` only.

Under `FakeTensorMode` a tensor on `cuda:0` has shape, dtype and device but no memory, and no
op reaches the driver. What still asks the CUDA runtime is Python code around the ops:
Megatron (current device, streams, events, the RNG tracker's state), torch.distributed's
object collectives, and `nn.Module._apply`. `simulated_cuda()` answers each of those while it
is active and restores them on exit. Nothing here is imported by the package or by the CPU
backend (`megatron_rlp/backends/cpu.py` maps CUDA onto the CPU; this keeps CUDA as CUDA).

Each shim, and the code that needs it:

- `torch.cuda.current_device/device_count/set_device/synchronize/empty_cache`: Megatron's
  layers and DDP (`device=torch.cuda.current_device()`), the step's timers.
- `torch.cuda.Stream/Event/current_stream/default_stream/stream`: DDP buckets and the
  optimizer wait on streams; nothing runs asynchronously here, so waiting is a no-op.
- `Tensor.record_stream`: Megatron's MoE dispatcher (`moe_utils.maybe_move_tensor_to_cpu`)
  marks the token counts it copies to the host as used on the current stream; that is the
  caching allocator's bookkeeping, and with `NullStream`s it refuses the stream object.
- `torch.cuda.get_device_properties/mem_get_info`: the simulated card (`--device-gib`).
- the CUDA RNG (`torch.cuda.get/set_rng_state`, `manual_seed(_all)`, Megatron's
  `_get/_set_cuda_rng_state`): a CPU generator stands for the device's, so Megatron's
  tracker (`model_parallel_cuda_manual_seed`, `fork()`) keeps and swaps real states.
- `torch.distributed.all_gather_object/broadcast_object_list`: pickled objects travel as
  byte tensors, which the fake process group cannot carry; every rank of an SPMD job holds
  the same object here (the simulated rank's own).
- Megatron's gloo groups (`get_data_parallel_group_gloo`): a gloo group on the fake store
  crashes (`initialize_model_parallel(create_gloo_process_groups=False)`); the optimizer
  gets the NCCL-side group of the same ranks instead.
- `torch.distributed._coalescing_manager` as Megatron's grad buffers use it: the fake
  process group has no fake-tensor rule for `allreduce_coalesced_`, so the collectives
  inside run one by one (the same collectives, each synchronous).
- Megatron's grad-norm kernel (`clip_grads.l2_norm_impl`): on a GPU it is Transformer
  Engine's or Apex's fused `multi_tensor_l2norm`; neither imports without a driver, and
  Megatron's Python fallback reads every norm back to the host (`torch.tensor(list)`).
  The stand-in computes the same norm on the device ([1] fp32 on the grads' device).
- `nn.Module._apply`: fake parameters cannot be swapped (`swap_tensors` refuses tensors
  with weak references, which FakeTensorMode keeps). A conversion that changes nothing
  (`Float16Module`'s `.bfloat16()` of bf16 weights, `.to(cuda:0)` of weights on cuda:0) is
  skipped; a dtype cast is done in place (`param.data = ...`, `Module._apply`'s non-swap
  path; Megatron's Mamba mixer keeps fp32 parameters that `Float16Module` casts); a device
  move still fails, which on fake CUDA means a module was built on the host.
- `torch._dynamo.config.disable`: Megatron compiles its fused bias-dropout-add
  (`jit_fuser`); Dynamo does not trace fake tensors of an outer mode, so the same function
  runs eagerly (same ops, same shapes; kernel fusion is not what is simulated).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist

from megatron_rlp.backends.null_cuda import NullEvent, NullStream, fresh_noop


def _apply_unless_identity(original):
    """`nn.Module._apply` that leaves a tensor alone when `fn` does not change it, casts one
    in place (`param.data = fn(param)`, the non-swap path of `Module._apply`) when `fn`
    changes only its dtype, and hands any other change (a device move) to the original,
    which fails on fake tensors: on fake CUDA that means a module was built on the host."""

    def _apply(self, fn, recurse=True):
        if recurse:
            for child in self.children():
                child._apply(fn)
        with torch.no_grad():
            tensors = [*self._parameters.values(), *self._buffers.values()]
            changed = [(t, fn(t)) for t in tensors if t is not None]
            changed = [(t, new) for t, new in changed if new is not t]
            if any(new.device != t.device or new.shape != t.shape for t, new in changed):
                return original(self, fn, recurse=False)
            for key, buf in self._buffers.items():
                if buf is not None:
                    self._buffers[key] = fn(buf)
            for t, new in changed:
                if isinstance(t, torch.nn.Parameter):
                    t.data = new  # e.g. Mamba's fp32 A_log under Float16Module's .bfloat16()
        return self

    return _apply


class _Work:
    def wait(self):
        pass


@contextlib.contextmanager
def _no_coalescing(*args, **kwargs):
    yield _Work()


def _l2_norm_on_device(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    norms = [torch.linalg.vector_norm(t.float()) for t in tensor_lists[0]]
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _all_gather_object(object_list, obj, group=None):
    for i in range(len(object_list)):
        object_list[i] = obj


@contextlib.contextmanager
def simulated_cuda(device_gib: float = 80.0, gpus_per_node: int = 8, name: str = "H100"):
    """Answer the CUDA runtime queries listed in the module docstring while active.

    Args:
        device_gib: the simulated card's memory (GiB), as `get_device_properties` reports it.
        gpus_per_node: `torch.cuda.device_count()`.
        name: the card's name in `get_device_properties`.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mrandom

    generator = torch.Generator()  # stands for the device's default generator
    props = SimpleNamespace(name=f"simulated {name}", total_memory=int(device_gib * 2**30),
                            major=9, minor=0, multi_processor_count=132)

    def get_state(*args, **kwargs):
        return generator.get_state()

    def set_state(state, *args, **kwargs):
        generator.set_state(state.cpu() if state.device.type != "cpu" else state)

    def seed(value, *args, **kwargs):
        generator.manual_seed(int(value))

    patches = {
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "device_count"): lambda: gpus_per_node,
        (torch.cuda, "set_device"): fresh_noop(),
        (torch.cuda, "synchronize"): fresh_noop(),
        (torch.cuda, "empty_cache"): fresh_noop(),
        (torch.cuda, "Stream"): NullStream,
        (torch.cuda, "Event"): NullEvent,
        (torch.cuda, "current_stream"): lambda *a, **k: NullStream(),
        (torch.cuda, "default_stream"): lambda *a, **k: NullStream(),
        (torch.cuda, "stream"): lambda *a, **k: NullStream(),
        (torch.Tensor, "record_stream"): fresh_noop(),
        (torch.cuda, "get_device_properties"): lambda *a, **k: props,
        (torch.cuda, "get_device_name"): lambda *a, **k: props.name,
        (torch.cuda, "mem_get_info"): lambda *a, **k: (props.total_memory, props.total_memory),
        (torch.cuda, "get_rng_state"): get_state,
        (torch.cuda, "set_rng_state"): set_state,
        (torch.cuda, "manual_seed"): seed,
        (torch.cuda, "manual_seed_all"): seed,
        (torch.cuda.random, "get_rng_state"): get_state,
        (torch.cuda.random, "set_rng_state"): set_state,
        (torch.cuda.random, "manual_seed"): seed,
        (torch.cuda.random, "manual_seed_all"): seed,
        (mrandom, "_get_cuda_rng_state"): get_state,
        (mrandom, "_set_cuda_rng_state"): set_state,
        (dist, "all_gather_object"): _all_gather_object,
        (dist, "broadcast_object_list"): fresh_noop(),
        (parallel_state, "get_data_parallel_group_gloo"):
            lambda with_context_parallel=False, partial_data_parallel=False:
            parallel_state.get_data_parallel_group(
                with_context_parallel=with_context_parallel,
                partial_data_parallel=partial_data_parallel),
        (parallel_state, "get_expert_data_parallel_group_gloo"):
            lambda partial_expert_data_parallel=False:
            parallel_state.get_expert_data_parallel_group(
                partial_expert_data_parallel=partial_expert_data_parallel),
        (param_and_grad_buffer, "_coalescing_manager"): _no_coalescing,
        (clip_grads, "l2_norm_impl"): _l2_norm_on_device,
        (torch.nn.Module, "_apply"): _apply_unless_identity(torch.nn.Module._apply),
        (torch._dynamo.config, "disable"): True,
    }
    with contextlib.ExitStack() as stack:
        for (owner, attr), value in patches.items():
            stack.enter_context(mock.patch.object(owner, attr, value))
        # `distributed.torch_device` reads the launcher's local rank: one card per process.
        stack.enter_context(mock.patch.dict(os.environ, {"LOCAL_RANK": "0"}))
        yield props


def initialize_model_parallel(parallel, stack: contextlib.ExitStack) -> None:
    """Megatron's `parallel_state.initialize_model_parallel` for a config's `parallel`
    section (TP, PP, virtual PP, EP) on the fake process group, torn down when `stack`
    closes. No gloo groups: a gloo group on the fake store segfaults."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        create_gloo_process_groups=False)
    stack.callback(parallel_state.destroy_model_parallel)
