"""The update's layers under torch.compile (`train.compile_update`): regional compilation.

At 25M parameters on one CPU thread the packed update is ~60% of an RLP step, and a fifth of
it is memory-bound element-wise work between the GEMMs: RMSNorm, the QK norms, RoPE, SwiGLU,
the residual adds, and each of their backwards, one ATen kernel (one pass over the
activations) per op (docs/performance.md, "What bounds 12x"). At 0.8M the update is per-op
overhead. Inductor fuses those chains into one loop each, forward and backward (AOTAutograd
traces the backward of Megatron's own linear layers' autograd functions too).

As torchtitan's `apply_compile`, each transformer layer is compiled on its own (the layers
share code, so one graph serves every layer of a kind and shape), not the whole model: the
embedding, the output layer and the loss stay eager, and so does what cannot be traced:
- the core attention of every attention layer: the split tree attention
  (`packing.split_attention`), FlexAttention (`packing.flex`, compiled by itself) and the
  explicit-mask route find their layout in a Python registry keyed by the mask's storage.
  The core attention is called through `torch.compiler.disable`, whatever route it takes.
  Megatron calls it inside an activation-offloading context manager, after which Dynamo
  cannot resume within the layer: an attention layer compiles as four small graphs (input
  norm; QKV, QK norms and RoPE; output projection; residual add), an MLP layer as one;
- Mamba layers (the branch layout registry of `models.mamba`, the scan kernels) and MoE
  layers (data-dependent token dispatch) stay eager, said once by a warning.
Tensor parallelism (collectives inside Megatron's linear autograd functions), pipeline
parallelism (not tested) and Transformer Engine layers run the whole update eager, with one
warning.

The compiled call is installed only for the update's forward and backward passes
(`optimizer_update`), through `nn.Module`'s own `_compiled_call_impl` (what
`Module.compile()` sets: the modules, their names and state dicts stay as they are), so
rollouts, scoring and the compiled decode (`rlp.compile_decode`, packing/compiled.py) keep
their own forwards. Activation recomputation composes: Megatron's `CheckpointFunction`
reruns the compiled layers in the backward (`full`: one more graph, without gradients, for
the first forward), and selective recompute's checkpoint of the core attention stays out of
the graph. Megatron DDP's gradient hooks sit on the parameters' AccumulateGrad nodes, which
the compiled backward feeds as the eager one does.

Shapes are dynamic (`dynamic=True`): micro-batch widths change every step, and one set of
graphs per layer kind and grad mode serves them all (10 graphs for a dense model, whatever
its depth: the first layer of a kind gets versions of its own). Every graph compilation is counted
(`compile_count`, the `update_compiles` metric). Loss, every gradient and the parameters after
the step equal the eager update's within fp32 rounding (tests/unit/test_compiled_update.py);
measured in docs/performance.md ("The update's layers compiled").

Written here because Megatron-Core has no torch.compile of its layers (its CUDA graphs
capture static-shape GPU launches, not fusion), and torchtitan's `apply_compile` is for its
own modules.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from megatron_rlp.models.provider import transformer_impl, unwrap_model
from megatron_rlp.packing.compiled import _tp_group_quietly

BACKEND = "inductor"  # tests: "aot_eager" (the same graphs, no code generation)
_compiles = 0
_warned: set[str] = set()
_RECOMPILE_LIMIT = 64


def compile_count() -> int:
    """Graph compilations of the update's layers in this process (first compilations,
    recompiles and the pieces around graph breaks): the `update_compiles` metric."""
    return _compiles


def _counting_inductor(graph, example_inputs):
    """torch.compile backend: inductor (C++ on CPU, Triton on CUDA), counted."""
    from torch._inductor.compile_fx import compile_fx

    global _compiles
    _compiles += 1
    return compile_fx(graph, example_inputs)


def _counting_backend(backend: str):
    if backend == "inductor":
        return _counting_inductor

    def counted(graph, example_inputs):  # e.g. "aot_eager" (tests: no C++ compile)
        global _compiles
        _compiles += 1
        return torch._dynamo.lookup_backend(backend)(graph, example_inputs)

    return counted


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"train.compile_update: {reason}", stacklevel=4)


def eager_reason(cfg) -> str | None:
    """Why the whole update runs eager under this config (one line), or None.

    Args:
        cfg: the `RunConfig`.
    """
    p = cfg.parallel
    if p.tensor_model_parallel_size > 1:
        return (f"eager update with tensor_model_parallel_size={p.tensor_model_parallel_size}"
                " (collectives inside Megatron's linear layers are not traced)")
    if p.pipeline_model_parallel_size > 1:
        return (f"eager update with pipeline_model_parallel_size="
                f"{p.pipeline_model_parallel_size} (not tested)")
    if transformer_impl(cfg) != "local":
        return "eager update with Transformer Engine layers (model.transformer_impl=local " \
               "compiles)"
    return None


def compilable(layer: nn.Module) -> bool:
    """Attention (`*`) and MLP (`-`) layers: Megatron's `TransformerLayer` and `MLPLayer`
    without MoE experts (`E` layers are `MoETransformerLayer`s, models/moe.py)."""
    if not isinstance(layer, (TransformerLayer, MLPLayer)):
        return False
    return not any(isinstance(m, MoELayer) for m in layer.modules())


def _call(module: nn.Module, *args, **kwargs):
    return module._call_impl(*args, **kwargs)


@functools.cache
def _compiled(backend: str):
    """One compiled `_call` per backend: the module is an argument, so every layer of a kind
    (same code, same attribute types) reuses its graphs instead of compiling its own."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(_call, backend=_counting_backend(backend), dynamic=True)


def _eager_core(core: nn.Module):
    """`core(...)` outside any graph: calls the core attention's current forward (routed or
    Megatron's), looked up at call time."""
    return torch.compiler.disable(core._call_impl, recursive=True)


@contextlib.contextmanager
def compiled_layers(chunks: list[nn.Module], backend: str = "inductor") -> Iterator[int]:
    """Within the block, the attention and MLP layers of `chunks` (the policy's DDP-wrapped
    or bare pipeline chunks) run compiled; yields how many layers were compiled.

    Mamba and MoE layers stay eager (one warning). All layers share one compiled function
    (`_compiled`), so later blocks, and other models of the process, reuse its graphs.

    Args:
        chunks: model chunks; each unwraps (`models.provider.unwrap_model`) to a model with
            `decoder.layers`.
        backend: `inductor`; `aot_eager` traces and runs the same graphs without code
            generation (tests).
    """
    layers = [layer for c in chunks for layer in unwrap_model(c).decoder.layers]
    chosen = [layer for layer in layers if compilable(layer)]
    if len(chosen) < len(layers):
        kinds = sorted({type(layer).__name__ for layer in layers if not compilable(layer)})
        _warn_once(f"{', '.join(kinds)} layers run eager (Mamba and MoE layers are not "
                   "compiled)")
    cores = [m.core_attention for layer in chosen for m in layer.modules()
             if isinstance(getattr(m, "core_attention", None), nn.Module)]
    original = tp_layers.get_tensor_model_parallel_group_if_none
    tp_layers.get_tensor_model_parallel_group_if_none = _tp_group_quietly
    for core in cores:
        core._compiled_call_impl = _eager_core(core)
    for layer in chosen:
        layer._compiled_call_impl = functools.partial(_compiled(backend), layer)
    try:
        yield len(chosen)
    finally:
        tp_layers.get_tensor_model_parallel_group_if_none = original
        for module in chosen + cores:  # as before: the class's None, not an instance
            # attribute, which the compiled decode step's guards would see as a change
            # (one recompile of the rollout graph after the first update)
            module.__dict__.pop("_compiled_call_impl", None)


def update_context(state) -> contextlib.AbstractContextManager:
    """`compiled_layers(state.model_chunks)` when `state.cfg`'s `train.compile_update` is on
    and applies (`eager_reason`: else one warning and a null context)."""
    cfg = state.cfg
    if not cfg.train.compile_update:
        return contextlib.nullcontext()
    reason = eager_reason(cfg)
    if reason is not None:
        _warn_once(reason)
        return contextlib.nullcontext()
    return compiled_layers(state.model_chunks, BACKEND)


def is_compiled(module: nn.Module) -> bool:
    """Whether `module`'s calls currently go through a compiled call."""
    return getattr(module, "_compiled_call_impl", None) is not None

