"""The custom ops behind `tools/simulated_mamba.py`'s kernel stand-ins: outputs shaped and typed
as mamba-ssm's / causal-conv1d's kernels allocate them (fake implementations only: on real
tensors they refuse to run), and their FLOP formulas for `FlopCounterMode`. Registered on
import, before the simulation's `FlopCounterMode` copies the formula registry."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


def _fake_only(*args, **kwargs):
    raise NotImplementedError("simulated_mamba ops run on fake tensors only (on a GPU the "
                              "mamba-ssm / causal-conv1d kernels run)")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# --- the custom ops: outputs as the kernels allocate them ---------------------------------

@torch.library.custom_op("simulated_mamba::ssd_fwd", mutates_args=())
def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
            z: Tensor | None, state_fp32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> out [b, l, h, p] (x dtype), out_x (like out with z, else empty), dA_cumsum
    [b, h, c, T] fp32, final states [b, h, p, n] (fp32 or C's dtype)."""
    return _fake_only()


@ssd_fwd.register_fake
def _(x, dt, A, B, C, chunk_size, z, state_fp32):
    b, length, h, p = x.shape
    n = B.shape[-1]
    c = math.ceil(length / chunk_size)
    return (x.new_empty(x.shape), x.new_empty(x.shape) if z is not None else _empty(x),
            x.new_empty(b, h, c, chunk_size, dtype=torch.float32),
            x.new_empty(b, h, p, n, dtype=torch.float32 if state_fp32 else C.dtype))


@torch.library.custom_op("simulated_mamba::ssd_bwd", mutates_args=())
def ssd_bwd(dout: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            chunk_size: int, D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None,
            initial_states: Tensor | None) -> list[Tensor]:
    """-> dx, ddt, dA (fp32), dB, dC, dD, dz, ddt_bias (fp32), dinitial_states (empty where
    the input is None)."""
    return _fake_only()


@ssd_bwd.register_fake
def _(dout, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states):
    def like(t, dtype=None):
        return _empty(x) if t is None else torch.empty_like(t, dtype=dtype)

    return [x.new_empty(x.shape), dt.new_empty(dt.shape), A.new_empty(A.shape, dtype=torch.float32),
            B.new_empty(B.shape), C.new_empty(C.shape), like(D), like(z),
            like(dt_bias, torch.float32), like(initial_states)]


@torch.library.custom_op("simulated_mamba::conv_fwd", mutates_args=())
def conv_fwd(x: Tensor, weight: Tensor, bias: Tensor | None,
             initial_states: Tensor | None, final_states: bool) -> tuple[Tensor, Tensor]:
    """x [b, d, l] -> out like x, final states [b, d, w - 1] (x dtype; empty unless asked)."""
    return _fake_only()


@conv_fwd.register_fake
def _(x, weight, bias, initial_states, final_states):
    final = (x.new_empty(x.shape[0], weight.shape[-1] - 1, x.shape[1]).transpose(1, 2)
             if final_states else _empty(x))
    return torch.empty_like(x), final


@torch.library.custom_op("simulated_mamba::conv_bwd", mutates_args=())
def conv_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor,
             initial_states: Tensor | None) -> list[Tensor]:
    """-> dx like x, dweight and dbias fp32 (causal-conv1d's `zeros_like(..., kFloat)`),
    dinitial_states."""
    return _fake_only()


@conv_bwd.register_fake
def _(x, weight, bias, dout, initial_states):
    return [torch.empty_like(x), torch.empty_like(weight, dtype=torch.float32),
            _empty(x) if bias is None else torch.empty_like(bias, dtype=torch.float32),
            _empty(x) if initial_states is None else torch.empty_like(initial_states)]


@torch.library.custom_op("simulated_mamba::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: Tensor, weight: Tensor, z: Tensor | None, groups: int
                ) -> tuple[Tensor, Tensor]:
    """x [M, N] -> y like x, rstd [groups * M] fp32."""
    return _fake_only()


@rmsnorm_fwd.register_fake
def _(x, weight, z, groups):
    return torch.empty_like(x), x.new_empty(groups * x.shape[0], dtype=torch.float32)


@torch.library.custom_op("simulated_mamba::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor | None, rstd: Tensor
                ) -> list[Tensor]:
    """-> dx like x, dweight (weight dtype), dz like z (empty without z)."""
    return _fake_only()


@rmsnorm_bwd.register_fake
def _(dy, x, weight, z, rstd):
    return [torch.empty_like(x), torch.empty_like(weight),
            _empty(x) if z is None else torch.empty_like(z)]


# --- FLOPs (FlopCounterMode gets shapes) ---------------------------------------------------

def _ssd_terms(x_shape, B_shape, chunk_size) -> tuple[int, int, int]:
    """2 b L per (g T n, h T p, h p n) term: the C.B^T blocks, the decayed (C.B^T) x blocks,
    and a state product; L = the length in whole chunks (the kernels compute whole T x T
    blocks, as `ops.mamba_chunk_scan_combined` does)."""
    b, length, h, p = x_shape
    g, n = B_shape[-2:]
    bl2 = 2 * b * math.ceil(length / chunk_size) * chunk_size
    return bl2 * g * chunk_size * n, bl2 * h * chunk_size * p, bl2 * h * p * n


@register_flop_formula(torch.ops.simulated_mamba.ssd_fwd)
def _ssd_fwd_flops(x_shape, dt_shape, A_shape, B_shape, C_shape, chunk_size, *args,
                   out_shape=None, **kwargs) -> int:
    """C.B^T, the intra-chunk product, the chunk states and the entering states' readout."""
    cb, intra, state = _ssd_terms(x_shape, B_shape, chunk_size)
    return cb + intra + 2 * state


@register_flop_formula(torch.ops.simulated_mamba.ssd_bwd)
def _ssd_bwd_flops(dout_shape, x_shape, dt_shape, A_shape, B_shape, C_shape, chunk_size,
                   *args, out_shape=None, **kwargs) -> int:
    """`_mamba_chunk_scan_combined_bwd`: recomputed C.B^T and chunk states; dstates, dx (from
    the states and from C.B^T), dB, dC, dCB and its two products, the stable ddA."""
    cb, intra, state = _ssd_terms(x_shape, B_shape, chunk_size)
    return 3 * cb + 3 * intra + 5 * state


@register_flop_formula(torch.ops.simulated_mamba.conv_fwd)
def _conv_fwd_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * w_shape[-1]


@register_flop_formula(torch.ops.simulated_mamba.conv_bwd)
def _conv_bwd_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * math.prod(x_shape) * w_shape[-1]  # dx and dweight
