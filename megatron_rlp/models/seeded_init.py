"""Layout-independent initialisation: every layer draws its weights from a seed of its own.

Megatron draws initial weights from one random stream in build order. Under pipeline
parallel each stage builds only its own layers, so stage 1's first layer would get the
weights PP=1 gives layer 0. Seeding the CPU generator with (seed, global layer number) before
each layer is built makes the draws depend on the layer alone; with Megatron's
`use_cpu_initialization` (full weights drawn on the CPU, then split) the initial model is
identical under every TP/PP layout — the basis of the layout-equivalence tests.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
from megatron.core.transformer.spec_utils import ModuleSpec


def seed_generator(seed: int, layer_number: int = 0) -> None:
    """Seed the CPU generator only (the CUDA generators and Megatron's tracker are untouched)."""
    torch.default_generator.manual_seed((seed * 1_000_003 + layer_number) % (2**63))


@functools.cache
def _seeded(cls: type) -> type:
    class Seeded(cls):
        def __init__(self, *args, init_seed: int, layer_number: int = 1, **kwargs):
            seed_generator(init_seed, layer_number)
            super().__init__(*args, layer_number=layer_number, **kwargs)

    Seeded.__name__, Seeded.__qualname__ = cls.__name__, cls.__qualname__
    Seeded.__doc__ = cls.__doc__
    return Seeded


def seed_layers_by_number(stack_spec: ModuleSpec, seed: int) -> ModuleSpec:
    """A copy of a HybridStack spec whose every layer kind seeds itself by layer number."""
    spec = copy.copy(stack_spec)
    layers = {}
    for f in dataclasses.fields(spec.submodules):
        layer = getattr(spec.submodules, f.name)
        if isinstance(layer, ModuleSpec) and isinstance(layer.module, type):
            layers[f.name] = dataclasses.replace(
                layer, module=_seeded(layer.module), params={**layer.params, "init_seed": seed})
    spec.submodules = dataclasses.replace(spec.submodules, **layers)
    return spec
