"""What the Transformer Engine (TE) path needs, as pure functions the config can check early.

`model.transformer_impl` picks the layer spec (models/provider.py `layer_spec`):

| transformer_impl | device=cpu | device=cuda, TE imports | device=cuda, no TE |
|---|---|---|---|
| `auto` (default) | local | transformer_engine | local |
| `local` | local | local | local |
| `transformer_engine` | refused | transformer_engine | refused |

FP8 (`precision.fp8`) runs only inside TE layers, on CUDA, on a GPU whose compute capability
the recipe supports. The requirements are Transformer Engine's own checks
(`transformer_engine.pytorch.quantization`: `check_fp8_support`,
`check_fp8_block_scaling_support`, `check_mxfp8_support`) with one tightening the project
asks for: delayed/tensorwise scaling is claimed for Hopper (sm_90) and newer only; TE also
runs it on Ada (sm_89, CUDA >= 12.1), which no one has tried with this code.

| fp8_recipe | compute capability | CUDA | Megatron needs TE |
|---|---|---|---|
| delayed | >= 9.0 | any | any |
| tensorwise | >= 9.0 | any | >= 2.2 |
| blockwise | >= 9.0 | >= 12.9 | >= 2.3 |
| mxfp8 | 10.x or 11.x (Blackwell) | any | >= 2.1 |

Every function here takes the facts as arguments (`te_available`, `capability`) so that the
rules are tested on a CPU-only machine; `transformer_engine_available()` and
`cuda_capability()` read the facts of this machine. Nothing imports torch or TE at module
import.
"""

from __future__ import annotations

import functools
import importlib
import os

TE_INSTALL_HINT = ("Transformer Engine (pip install --no-build-isolation "
                   "'transformer-engine[pytorch]', or an NGC PyTorch container)")

# recipe -> (minimum capability, first capability no longer supported, minimum CUDA, GPU words)
FP8_RECIPE_HARDWARE: dict[str, tuple[tuple[int, int], tuple[int, int] | None,
                                     tuple[int, int] | None, str]] = {
    "delayed": ((9, 0), None, None, "Hopper (sm_90) or newer"),
    "tensorwise": ((9, 0), None, None, "Hopper (sm_90) or newer"),
    "blockwise": ((9, 0), None, (12, 9), "Hopper (sm_90) or newer with CUDA >= 12.9"),
    "mxfp8": ((10, 0), (12, 0), None, "Blackwell (sm_100 / sm_110)"),
}


@functools.cache
def transformer_engine_available() -> bool:
    """True when `transformer_engine.pytorch` imports on this machine (cached)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # ImportError, or a broken install failing inside its own import
        return False
    return True


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of this process's GPU (`LOCAL_RANK`, else 0), or None without CUDA.

    Reads device properties only (no tensor, no context on another rank's GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    return tuple(torch.cuda.get_device_capability(index))


def cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the CUDA runtime torch was built with, or None (CPU build)."""
    import torch

    if not torch.version.cuda:
        return None
    major, minor = torch.version.cuda.split(".")[:2]
    return int(major), int(minor)


def resolve_transformer_impl(impl: str, device_type: str, te_available: bool) -> str:
    """`auto | local | transformer_engine` -> the spec to build: `local` or
    `transformer_engine`. `auto` is TE when it imports and the run is on CUDA.

    Raises:
        ValueError: `transformer_engine` asked for on CPU or without TE (the message says
            what is needed).
    """
    if impl == "local":
        return "local"
    if impl == "auto":
        return "transformer_engine" if device_type == "cuda" and te_available else "local"
    if impl != "transformer_engine":
        raise ValueError(f"unknown transformer_impl {impl!r}")
    if device_type != "cuda":
        raise ValueError("device.type=cuda (Transformer Engine layers are CUDA-only)")
    if not te_available:
        raise ValueError(f"{TE_INSTALL_HINT} to be importable")
    return "transformer_engine"


def fp8_requirement(recipe: str, device_type: str, te_available: bool,
                    capability: tuple[int, int] | None,
                    cuda: tuple[int, int] | None = None) -> str | None:
    """None when FP8 with `recipe` can run here, else what is missing (one phrase).

    Args:
        recipe: `precision.fp8_recipe` (delayed, tensorwise, blockwise, mxfp8).
        device_type: `device.type`.
        te_available: whether Transformer Engine imports.
        capability: the GPU's compute capability, None when no GPU is visible.
        cuda: the CUDA version torch was built with (checked for recipes that need one).
    """
    low, high, min_cuda, words = FP8_RECIPE_HARDWARE[recipe]
    if device_type != "cuda":
        return f"device.type=cuda, {TE_INSTALL_HINT} and a {words} GPU"
    if not te_available:
        return f"{TE_INSTALL_HINT}; FP8 runs only inside Transformer Engine layers"
    if capability is None:
        return f"a visible {words} GPU (none found)"
    if capability < low or (high is not None and capability >= high):
        return (f"a {words} GPU for fp8_recipe={recipe} (this GPU is sm_{capability[0]}"
                f"{capability[1]})")
    if min_cuda is not None and (cuda is None or cuda < min_cuda):
        got = "none" if cuda is None else f"{cuda[0]}.{cuda[1]}"
        return (f"CUDA >= {min_cuda[0]}.{min_cuda[1]} for fp8_recipe={recipe} "
                f"(torch has CUDA {got})")
    return None
