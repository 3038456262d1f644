"""Which Mamba-2 kernels Megatron's own `MambaMixer` calls: mamba-ssm's (GPU) or the pure-torch
ones in `ops.py` (CPU, CI, or a GPU machine without the kernels).

`megatron.core.ssm.mamba_mixer` binds its kernels as module globals at import time. Without
`mamba_ssm` it sets `HAVE_MAMBA_SSM = False` (the mixer then refuses to construct) and makes
its gated norm `ExtendedRMSNorm` a subclass of a `MagicMock`; with `mamba_ssm` but without
`causal_conv1d` its fused training kernel calls `None`. Its decode kernels (Megatron's Triton
`selective_state_update` and `causal_conv1d_update`) cannot run on CPU tensors.
`select_kernels()` binds one consistent set of those globals:

| global in mamba_mixer | torch path | kernel path |
|---|---|---|
| `HAVE_MAMBA_SSM` | True | True |
| `mamba_chunk_scan_combined` | `ops.*` (chunk <= 32 on CPU) | mamba-ssm's Triton |
| `mamba_split_conv1d_scan_combined` | `ops.*` (chunk <= 32 on CPU) | mamba-ssm's Triton |
| `RMSNormGated`, `ExtendedRMSNorm` | `ops.RMSNormGated` (1) | mamba-ssm's Triton `RMSNorm` (1) |
| `causal_conv1d_update` | `ops.causal_conv1d_update` behind a transpose | Megatron's Triton |
| `selective_state_update` | `ops.selective_state_update` | Megatron's Triton, guarded (below) |
| `causal_conv1d_fn` | None: the mixer's own `F.conv1d` path | causal-conv1d's CUDA |
| `MAMBA_HAS_STATE_DTYPE` | as Megatron set it | whether mamba-ssm's scans take `state_dtype` |

(1) `ExtendedRMSNorm` adds Megatron's `sharded_state_dict` (weight sharded on axis 0).

Megatron's Triton `selective_state_update` (megatron-core 0.19.2) passes `x` as a dummy pointer
for its optional intermediate-state buffer, but its `HAS_INT_STATE` heuristic tests `is not
None`, so the kernel stores every program's state into `x`'s first element (strides 0) while
program (0, 0, 0) may still be reading it: a race on the first head's first channel (found
running it under Triton's interpreter, `tests/kernels`). `no_dummy_state_writes` hands it a
one-element scratch buffer instead.

The choice: the kernel path when mamba-ssm's Triton kernels *and* causal-conv1d import and
CUDA is available; otherwise the torch path. A torch fallback where kernels were expected (a
CUDA machine, or mamba-ssm installed without causal-conv1d) warns once; a CPU machine without
them logs it (the expected case). The choice is made once per process, when the first Mamba
layer is built (`mixer.LocalMambaMixer`), and is reported by `kernel_choice()`, which the
training loop writes into every metrics record (`mamba_kernels`). `select_kernels(force=...)`
binds a path explicitly (the kernel tests run the kernel path under Triton's interpreter).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import Tensor

from megatron_rlp.models.mamba import ops

logger = logging.getLogger(__name__)

TORCH = "torch"
MAMBA_SSM = "mamba_ssm"
_BOUND = ("HAVE_MAMBA_SSM", "MAMBA_HAS_STATE_DTYPE", "RMSNormGated", "ExtendedRMSNorm",
          "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "causal_conv1d_fn",
          "causal_conv1d_update", "selective_state_update")
_choice: str | None = None
_megatron_bound: dict | None = None  # the globals as Megatron's import set them

# The SSD result does not depend on the chunk size (only rounding does). Megatron asks for
# 128, the GPU kernels' sweet spot; the torch scan's intra-chunk work grows with the chunk
# (T x T decay matrices), and on CPU 32 measured ~4x faster than 128 (fwd+bwd, 150 tokens).
CPU_CHUNK_SIZE = 32


def scan_chunk(chunk_size: int, t: Tensor) -> int:
    """The chunk the torch kernels use for `t`'s device: Megatron's on GPU, <= 32 on CPU."""
    return chunk_size if t.is_cuda else min(chunk_size, CPU_CHUNK_SIZE)


def _chunk_scan(x, dt, A, B, C, chunk_size, *args, **kwargs):
    return ops.mamba_chunk_scan_combined(x, dt, A, B, C, scan_chunk(chunk_size, x), *args, **kwargs)


def _split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, *args,
                       **kwargs):
    return ops.mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A,
                                                D, scan_chunk(chunk_size, zxbcdt), *args, **kwargs)


def _conv_update_channel_last(x: Tensor, conv_state: Tensor, weight: Tensor,
                              bias: Tensor | None, silu_activation, conv_state_indices=None,
                              intermediate_conv_states=None) -> Tensor:
    """Megatron's Triton `causal_conv1d_update` convention: x [batch, (seqlen,) dim]."""
    if intermediate_conv_states is not None:
        raise NotImplementedError("intermediate conv states (speculative decoding) are not "
                                  "supported by the pure-torch kernels")
    if x.dim() == 2:
        return ops.causal_conv1d_update(x, conv_state, weight, bias, silu_activation,
                                        conv_state_indices=conv_state_indices)
    out = ops.causal_conv1d_update(x.transpose(1, 2), conv_state, weight, bias,
                                   silu_activation, conv_state_indices=conv_state_indices)
    return out.transpose(1, 2)


def _sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    """Megatron's `ExtendedRMSNorm.sharded_state_dict`: weight sharded on axis 0."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    if not hasattr(self, "tp_group"):
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
    state_dict = self.state_dict(prefix="", keep_vars=True)
    return make_sharded_tensors_for_checkpoint(
        state_dict, prefix, {"weight": 0}, sharded_offsets, tp_group=self.tp_group,
        dp_cp_group=metadata["dp_cp_group"])


class ExtendedRMSNorm(ops.RMSNormGated):
    """Megatron's `ExtendedRMSNorm` (gated RMSNorm with a TP-sharded state dict) on the torch
    norm. Without mamba_ssm Megatron's class is a `MagicMock` instance (it subclassed one), so
    its `sharded_state_dict` is restated here."""

    sharded_state_dict = _sharded_state_dict


def kernel_choice() -> str | None:
    """`MAMBA_SSM` or `TORCH` once a Mamba layer was built (or `select_kernels` ran), else None."""
    return _choice


def kernels_missing() -> str | None:
    """None when mamba-ssm's Triton kernels and causal-conv1d import; else why not (one line)."""
    for name in ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated",
                 "causal_conv1d"):
        try:
            __import__(name)
        except Exception as e:  # ImportError, or a CUDA extension failing to load
            return f"{name} does not import ({type(e).__name__}: {e})"
    return None


def no_dummy_state_writes(selective_state_update):
    """Megatron's Triton `selective_state_update` given a one-element scratch buffer (expanded,
    strides 0) for the intermediate states it writes when none is asked for (module doc), so
    that it never writes into `x`. Same signature and result."""

    def update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
               state_batch_indices=None, intermediate_ssm_states=None):
        if intermediate_ssm_states is None and state.dim() == 4:
            lead = x.shape if x.dim() == 4 else (x.shape[0], 1, *x.shape[1:])  # [b, s, h, p]
            intermediate_ssm_states = x.new_empty(1).expand(*lead, state.shape[-1])
        return selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus,
                                      state_batch_indices=state_batch_indices,
                                      intermediate_ssm_states=intermediate_ssm_states)

    return update


def _mamba_ssm_globals() -> dict:
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
    )
    from megatron.core.ssm.ops.causal_conv1d_triton import causal_conv1d_update
    from megatron.core.ssm.ops.mamba_ssm import selective_state_update

    megatron_norm = _megatron_bound["ExtendedRMSNorm"]
    built_on_it = isinstance(megatron_norm, type) and issubclass(megatron_norm, RMSNorm)
    norm = megatron_norm if built_on_it else type(
        "ExtendedRMSNorm", (RMSNorm,), {"sharded_state_dict": _sharded_state_dict})
    takes_state_dtype = all("state_dtype" in inspect.signature(f).parameters
                            for f in (mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined))
    return {"HAVE_MAMBA_SSM": True, "MAMBA_HAS_STATE_DTYPE": takes_state_dtype,
            "RMSNormGated": RMSNorm, "ExtendedRMSNorm": norm,
            "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
            "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined,
            "causal_conv1d_fn": causal_conv1d_fn, "causal_conv1d_update": causal_conv1d_update,
            "selective_state_update": no_dummy_state_writes(selective_state_update)}


def _torch_globals() -> dict:
    return {"HAVE_MAMBA_SSM": True,
            "MAMBA_HAS_STATE_DTYPE": _megatron_bound["MAMBA_HAS_STATE_DTYPE"],
            "RMSNormGated": ops.RMSNormGated, "ExtendedRMSNorm": ExtendedRMSNorm,
            "mamba_chunk_scan_combined": _chunk_scan,
            "mamba_split_conv1d_scan_combined": _split_conv1d_scan,
            "causal_conv1d_fn": None, "causal_conv1d_update": _conv_update_channel_last,
            "selective_state_update": ops.selective_state_update}


def select_kernels(force: str | None = None) -> str:
    """Bind the Mamba kernels into `megatron.core.ssm.mamba_mixer` (see the module doc) and
    return the path, `MAMBA_SSM` or `TORCH`. Without `force` the first call chooses and later
    calls return that choice; `force` binds the given path now.

    Raises:
        ValueError: `force` is not `MAMBA_SSM`, `TORCH` or None.
        ImportError: `force=MAMBA_SSM` where the kernels do not import.
    """
    global _choice, _megatron_bound
    from megatron.core.ssm import mamba_mixer as mm

    if force not in (None, TORCH, MAMBA_SSM):
        raise ValueError(f"select_kernels force={force!r}; allowed: {MAMBA_SSM!r}, {TORCH!r}, "
                         "None")
    if force is None and _choice is not None:
        return _choice
    if _megatron_bound is None:
        _megatron_bound = {name: getattr(mm, name) for name in _BOUND}
    choice = force
    if choice is None:
        missing = kernels_missing()
        cuda = torch.cuda.is_available()
        choice = MAMBA_SSM if missing is None and cuda else TORCH
        if choice == TORCH:
            why = missing or "no CUDA device"
            partial = missing is not None and missing.startswith("causal_conv1d")
            (logger.warning if cuda or partial else logger.info)(
                "Mamba layers use the pure-torch kernels (megatron_rlp.models.mamba.ops): %s",
                why)
        else:
            logger.info("Mamba layers use mamba-ssm's Triton kernels and causal-conv1d")
    for name, value in (_mamba_ssm_globals() if choice == MAMBA_SSM else _torch_globals()).items():
        setattr(mm, name, value)
    _choice = choice
    return choice
