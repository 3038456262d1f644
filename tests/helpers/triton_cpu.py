"""Run the GPU recipes' Triton kernels on CPU tensors, under Triton's interpreter (test support).

On a GPU, the hybrid recipes' Mamba layers run mamba-ssm's Triton kernels (chunked SSD scan,
gated RMSNorm, the fused split-conv-scan) and Megatron's own Triton decode kernels
(`megatron.core.ssm.ops`: `selective_state_update`, `causal_conv1d_update`). With
`TRITON_INTERPRET=1` Triton runs a `@triton.jit` kernel's Python body on numpy views of the
tensors, so the very same kernel code runs on CPU tensors here, slowly but exactly. It takes
a few shims, all in this module and all undone on exit of `triton_on_cpu()`:

1. **Interpreter at decoration.** Triton decides interpreted-or-compiled when `@triton.jit`
   decorates a function (module import), so the kernel modules are imported afresh with
   `TRITON_INTERPRET=1` set; the modules the rest of the suite imported are put back on exit.
   `triton.language`'s own jit functions (`tl.cumsum`, `tl.max`, ...) were decorated when
   triton was first imported: they are swapped for interpreted ones meanwhile. The
   interpreter's integer-overflow checks (device asserts, compiled only into debug builds
   on a GPU) are off: they took half of the interpreter's time.
2. **mamba-ssm's package `__init__`** imports its CUDA extension `selective_scan_cuda` (Mamba-1,
   not built here: `MAMBA_SKIP_CUDA_BUILD=TRUE`) and `mamba3` (tilelang). The `mamba_ssm`
   package is registered without running `__init__`; its submodules import normally.
3. **`torch.cuda.device(x.device.index)`** is entered around each launch; a CPU tensor's
   index is None, which would initialise CUDA. None (and CPU devices) enter nothing.
   `torch.cuda.get_device_capability` (Megatron's decode kernel picks block sizes by
   architecture) answers (9, 0), an H100, for a CPU device; `get_device_properties` answers
   `CPU_SM_COUNT` multiprocessors (backward kernels size their grids by it).
4. **The autotuner** times each config through the GPU driver's benchmarker. Here it runs
   the first config listed (every config computes the same result; only speed differs).
5. **causal-conv1d** (a CUDA-only extension, no CPU build) is emulated by the project's torch
   reference (`ops.causal_conv1d_fn`) with its C++ entry points' signatures, and only where
   the GPU path calls it: the fused split-conv-scan's forward and backward
   (`causal_conv1d.cpp_functions`) and the prefill's `causal_conv1d_fn`. Those convolutions
   are therefore checked as torch against torch; everything else is the GPU code itself.

Usage (the kernel tests' package fixture):
`with triton_on_cpu() as k: k.ssd.mamba_chunk_scan_combined(...)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import megatron.core.ssm.mamba_mixer  # noqa: F401 - imported (bound) outside the interpreter
import torch

from megatron_rlp.models.mamba import ops

MAMBA_SSM_VERSION = "2.3.2.post1"  # the version the Makefile pins (kernels target)
# The multiprocessor count a CPU "device" reports: some backward kernels launch one program
# per SM; fewer programs run faster under the interpreter (partial sums only regroup).
CPU_SM_COUNT = 8
_FRESH = ("mamba_ssm", "causal_conv1d", "megatron.core.ssm.ops.mamba_ssm",
          "megatron.core.ssm.ops.causal_conv1d_triton")


def _fresh(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _FRESH)


# --- 5. causal-conv1d, emulated by the torch reference --------------------------------------

def _act(silu: bool) -> str | None:
    return "silu" if silu else None


def _conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    """`causal_conv1d.cpp_functions.causal_conv1d_fwd_function`: x [b, d, l] -> [b, d, l]."""
    if seq_idx is not None:
        raise NotImplementedError("seq_idx is not emulated (the recipes do not pack documents)")
    res = ops.causal_conv1d_fn(x, weight, bias, initial_states=initial_states,
                               return_final_states=final_states_out is not None,
                               final_states_out=final_states_out,
                               activation=_act(silu_activation))
    return res[0] if isinstance(res, tuple) else res


def _conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
              return_dinitial_states, silu_activation):
    """`causal_conv1d_bwd_function`: (dx, dweight, dbias, dinitial_states) by autograd
    through the torch reference; dx is written into the given buffer, as the CUDA one does."""
    if seq_idx is not None or dfinal_states is not None:
        raise NotImplementedError("seq_idx / dfinal_states are not emulated")
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None
                  for t in (x, weight, bias, initial_states)]
        out = ops.causal_conv1d_fn(leaves[0], leaves[1], leaves[2], initial_states=leaves[3],
                                   activation=_act(silu_activation))
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, dout))
        gx, gw, gb, gi = (next(grads) if t is not None else None for t in leaves)
    if dx is not None:
        dx.copy_(gx)
        gx = dx
    return gx, gw, gb, gi if return_dinitial_states else None


def _conv_update(x, conv_state, weight, bias, silu_activation, cache_seqlens,
                 conv_state_indices):
    """`causal_conv1d_update_function` (mamba-ssm's own Mamba2 module; not on Megatron's path)."""
    return ops.causal_conv1d_update(x, conv_state, weight, bias, _act(silu_activation),
                                    cache_seqlens, conv_state_indices)


def _fake_causal_conv1d() -> dict[str, types.ModuleType]:
    pkg = types.ModuleType("causal_conv1d")
    pkg.__path__ = []  # a package: its submodules are the entries below
    pkg.__version__ = "emulated"
    pkg.causal_conv1d_fn = ops.causal_conv1d_fn
    pkg.causal_conv1d_update = ops.causal_conv1d_update
    cpp = types.ModuleType("causal_conv1d.cpp_functions")
    cpp.causal_conv1d_fwd_function = _conv_fwd
    cpp.causal_conv1d_bwd_function = _conv_bwd
    cpp.causal_conv1d_update_function = _conv_update
    pkg.cpp_functions = cpp
    return {"causal_conv1d": pkg, "causal_conv1d.cpp_functions": cpp}


# --- 2. mamba_ssm without its __init__ -----------------------------------------------------

def _mamba_ssm_package() -> types.ModuleType:
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"mamba-ssm is not installed: the kernel tests need mamba-ssm=={MAMBA_SSM_VERSION} "
            "(`make test` installs it; by hand: MAMBA_SKIP_CUDA_BUILD=TRUE "
            "MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps "
            f"mamba-ssm=={MAMBA_SSM_VERSION})")
    return importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run


# --- 3. CUDA device queries on CPU tensors --------------------------------------------------

def _is_cpu(device) -> bool:
    return device is None or (isinstance(device, torch.device) and device.type == "cpu")


@dataclass(frozen=True)
class _CpuProperties:
    name: str = "cpu (Triton interpreter)"
    multi_processor_count: int = CPU_SM_COUNT


@dataclass
class Kernels:
    """The interpreted kernel modules (Triton functions decorated under the interpreter)."""

    ssd: types.ModuleType  # mamba_ssm.ops.triton.ssd_combined
    layernorm_gated: types.ModuleType  # mamba_ssm.ops.triton.layernorm_gated
    decode: types.ModuleType  # megatron.core.ssm.ops.mamba_ssm (selective_state_update)
    conv_update: types.ModuleType  # megatron.core.ssm.ops.causal_conv1d_triton


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _interpret_triton_language(stack: contextlib.ExitStack) -> None:
    """Swap `triton.language`'s compiled jit functions for interpreted ones (shim 1)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    made: dict[int, InterpretedFunction] = {}
    for owner in (tl, tl.standard, tl.random, tl.tensor):
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                new = made.setdefault(id(value), InterpretedFunction(value.fn))
                stack.enter_context(_patched(owner, name, new))


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[Kernels]:
    """Import the GPU path's Triton kernels under the interpreter and make them launchable on
    CPU tensors (shims 1-5 of the module docstring) for the duration of the block. Inside it,
    `import mamba_ssm...`, `import causal_conv1d` and Megatron's Triton decode modules give
    the interpreted / emulated versions; on exit the interpreter is off and `sys.modules` is
    as before (functions already taken keep working, but launch only inside the block).

    Raises RuntimeError when mamba-ssm is not installed."""
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _fresh(k)}
    old_env = os.environ.get("TRITON_INTERPRET")
    real_device, real_cap = torch.cuda.device, torch.cuda.get_device_capability
    real_props, real_prune = torch.cuda.get_device_properties, Autotuner.prune_configs

    def device(index):
        return contextlib.nullcontext() if _is_cpu(index) else real_device(index)

    def capability(device=None):
        return (9, 0) if isinstance(device, torch.device) and device.type == "cpu" \
            else real_cap(device)

    def properties(device=None):
        return _CpuProperties() if isinstance(device, torch.device) and device.type == "cpu" \
            else real_props(device)

    def first_config(self, kwargs):
        return real_prune(self, kwargs)[:1]

    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with contextlib.ExitStack() as stack:
            for name, value in (("device", device), ("get_device_capability", capability),
                                ("get_device_properties", properties)):
                stack.enter_context(_patched(torch.cuda, name, value))
            stack.enter_context(_patched(Autotuner, "prune_configs", first_config))
            _interpret_triton_language(stack)
            builder = interpreter.interpreter_builder
            stack.enter_context(_patched(builder, "options", dataclasses.replace(
                builder.options, sanitize_overflow=False)))
            sys.modules.update(_fake_causal_conv1d())
            sys.modules["mamba_ssm"] = _mamba_ssm_package()
            yield Kernels(
                ssd=importlib.import_module("mamba_ssm.ops.triton.ssd_combined"),
                layernorm_gated=importlib.import_module("mamba_ssm.ops.triton.layernorm_gated"),
                decode=importlib.import_module("megatron.core.ssm.ops.mamba_ssm"),
                conv_update=importlib.import_module("megatron.core.ssm.ops.causal_conv1d_triton"),
            )
    finally:
        for k in [k for k in sys.modules if _fresh(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
