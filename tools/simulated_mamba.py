"""Mamba-2's fused GPU kernels, as `tools/simulate_gpu.py` runs them on fake CUDA tensors.

On a GPU with mamba-ssm and causal-conv1d, `models/mamba/adapter.select_kernels` binds into
Megatron's `mamba_mixer` mamba-ssm's Triton autograd Functions and causal-conv1d's CUDA one;
without them (the CPU, this simulation) it binds the plain-torch ops of `models/mamba/ops.py`,
whose chunked SSD scan keeps in fp32, per layer, [b, chunks, heads, chunk, chunk] decay
matrices, chunk states and upcast copies of its inputs for backward. The kernels keep only
their inputs and a few small tensors, and recompute the rest in backward. A simulated update
with the torch ops therefore reports a Mamba layer's memory that no GPU run has.

`fused_mamba_kernels()` binds, for as long as it is active, stand-ins with the signatures of
the functions the mixer calls on the GPU path (`_BOUND` names in `mamba_mixer`; the packed
update's `models/mamba/branches.py` reads the same globals):

- `mamba_chunk_scan_combined` (mamba-ssm 2.3.2 `ssd_combined.MambaChunkScanCombinedFn`)
  saves out (out_x with z), x, dt, dA_cumsum [b, h, c, T] fp32, A, B, C, D, z, dt_bias,
  initial_states;
- `mamba_split_conv1d_scan_combined` (`MambaSplitConv1dScanCombinedFn`) saves zxbcdt, the
  conv weight and bias, out_x, A, D, dt_bias, initial_states, rmsnorm_weight, rstd and the
  out_proj weight and bias;
- `RMSNormGated` / `ExtendedRMSNorm` (`layernorm_gated.LayerNormFn`, rms) saves x and z as
  2-D rows (a copy where `reshape` copies), the weight and rstd [groups x rows] fp32;
- `causal_conv1d_fn` (causal-conv1d's `CausalConv1dFn`) saves x, weight, bias,
  initial_states.

Each is an `autograd.Function` whose forward and backward call a custom op
(`simulated_mamba::*`, torch.library, in `tools/simulated_mamba_ops.py`) that returns fresh
outputs of the kernel's shapes and dtypes on the inputs' device (values do not matter on fake
tensors; on real tensors the ops refuse to run). `FlopCounterMode` counts the ops by the
formulas registered there (SSD: chunked scan with whole T x T chunk blocks, as the torch ops
count it, forward and the kernel's backward; conv: 2 FLOPs per tap). Before a kernel runs, its
arguments are checked as the kernel checks them, and a mismatch raises `SimulationError` in
one line (kernel, tensors, caller's file:line): a tensor off the CUDA device of `x` (Triton
and causal-conv1d take device pointers of one GPU), a non-float tensor (the Triton kernels
load floats), and causal-conv1d's `TORCH_CHECK`s (x and weight fp32/fp16/bf16, bias of the
weight's dtype, initial states of x's dtype).

What it proves: the GPU path's shapes, dtypes and devices at the mixer's call sites, and the
memory it keeps; what it does not: the kernels' numerics, their internal scratch (CB
[b, c, g, T, T] and chunk states [b, c, h, p, n] in fp32, freed inside the call: MBs per
layer) and their speed. Written here, not in the package: it only makes sense on fake tensors.
The decode-step kernels (`selective_state_update`, `causal_conv1d_update`) keep the torch ops:
they work in place on the cache and keep nothing for backward.
"""

from __future__ import annotations

import contextlib

import simulated_mamba_ops  # noqa: F401 (registers the torch.ops.simulated_mamba ops)
import torch
from simulated_values import SimulationError, caller_site
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # causal-conv1d's dispatch types


def _describe(name: str, t: Tensor) -> str:
    return f"`{name}` ({t.device} {str(t.dtype).removeprefix('torch.')} {list(t.shape)})"


def _refuse(kernel: str, like: str, tensors: dict[str, Tensor | None],
            checks: tuple = ()) -> None:
    """Raise `SimulationError` (one line) where the kernel would refuse its arguments: every
    tensor on the CUDA device of `tensors[like]` and of a floating dtype, then `checks`:
    (ok, why) pairs of the kernel's own dtype checks."""
    ref = tensors[like]
    why = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda" or t.device != ref.device:
            why = f"{_describe(name, t)} is not on {ref.device} with `{like}`"
        elif not t.dtype.is_floating_point:
            why = f"{_describe(name, t)} is not a floating tensor"
        if why:
            break
    why = why or next((reason for ok, reason in checks if not ok), None)
    if why:
        given = ", ".join(_describe(k, v) for k, v in tensors.items() if v is not None)
        raise SimulationError(f"{kernel} on {given} at {caller_site()}: {why}")


def _grad(given: Tensor | None, grad: Tensor) -> Tensor | None:
    """A backward op's grad for an optional input: None where the input was None."""
    return None if given is None else grad


# --- the autograd Functions: what each kernel saves ----------------------------------------

class _ChunkScan(torch.autograd.Function):
    """`MambaChunkScanCombinedFn`: saves out (out_x with z), x, dt, dA_cumsum, A, B, C, D, z,
    dt_bias, initial_states."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                return_final_states, state_fp32):
        out, out_x, dA_cumsum, final = torch.ops.simulated_mamba.ssd_fwd(
            x, dt, A, B, C, chunk_size, z, state_fp32)
        ctx.save_for_backward(out if z is None else out_x, x, dt, dA_cumsum, A, B, C, D, z,
                              dt_bias, initial_states)
        ctx.chunk_size = chunk_size
        return (out, final) if return_final_states else out

    @staticmethod
    def backward(ctx, dout, *dfinal):
        _, x, dt, _, A, B, C, D, z, dt_bias, init = ctx.saved_tensors
        _refuse("mamba_chunk_scan_combined backward", "x", {"x": x, "dout": dout})
        grads = torch.ops.simulated_mamba.ssd_bwd(dout.contiguous(), x, dt, A, B, C,
                                                  ctx.chunk_size, D, z, dt_bias, init)
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads
        return (dx, ddt, dA, dB, dC, None, _grad(D, dD), _grad(z, dz), _grad(dt_bias, ddt_bias),
                _grad(init, dinit), None, None)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False,
                              state_dtype=None):
    """mamba-ssm's `mamba_chunk_scan_combined` (shapes in `ops.mamba_chunk_scan_combined`)."""
    if seq_idx is not None or return_varlen_states:
        raise NotImplementedError("simulated mamba_chunk_scan_combined: packed sequences "
                                  "(seq_idx / varlen states) are not modelled")
    _refuse("mamba_chunk_scan_combined", "x", {"x": x, "dt": dt, "A": A, "B": B, "C": C,
                                               "D": D, "z": z, "dt_bias": dt_bias,
                                               "initial_states": initial_states})
    return _ChunkScan.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                            return_final_states, state_dtype in (None, torch.float32))


def _rows(t: Tensor | None) -> Tensor | None:
    """`LayerNormFn`'s 2-D view of x or z: reshape (a copy where a view cannot be had), then
    contiguous if the last dim is strided."""
    if t is None:
        return None
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _GatedRMSNorm(torch.autograd.Function):
    """`layernorm_gated.LayerNormFn` with `is_rms_norm`: saves x and z as rows, weight,
    rstd."""

    @staticmethod
    def forward(ctx, x, weight, z, group_size):
        shape = x.shape
        x2, z2 = _rows(x), _rows(z)
        groups = shape[-1] // (group_size or shape[-1])
        y, rstd = torch.ops.simulated_mamba.rmsnorm_fwd(x2, weight.contiguous(), z2, groups)
        ctx.save_for_backward(x2, weight, z2, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, z2, rstd = ctx.saved_tensors
        _refuse("rmsnorm_fn backward", "x", {"x": x2, "dy": dy})
        dx, dw, dz = torch.ops.simulated_mamba.rmsnorm_bwd(_rows(dy), x2, weight, z2, rstd)
        return (dx.reshape(ctx.shape), dw, None if z2 is None else dz.reshape(ctx.shape),
                None)


def rmsnorm_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None,
               norm_before_gate=True):
    """mamba-ssm's `layernorm_gated.rmsnorm_fn` (no bias: Megatron's gated norm has none)."""
    if bias is not None:
        raise NotImplementedError("simulated rmsnorm_fn: a bias is not modelled")
    _refuse("rmsnorm_fn", "x", {"x": x, "weight": weight, "z": z})
    return _GatedRMSNorm.apply(x, weight, z, group_size)


class RMSNormGated(torch.nn.Module):
    """mamba-ssm's `layernorm_gated.RMSNorm` (parameters as `ops.RMSNormGated`'s)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True,
                 device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps,
                          group_size=self.group_size, norm_before_gate=self.norm_before_gate)


def _conv_checks(x: Tensor, weight: Tensor, bias, initial_states) -> tuple:
    """causal-conv1d's `TORCH_CHECK`s on dtypes (csrc/causal_conv1d.cpp)."""
    return ((x.dtype in _FLOATS, f"x is {x.dtype} (allowed: float32, float16, bfloat16)"),
            (weight.dtype in _FLOATS,
             f"weight is {weight.dtype} (allowed: float32, float16, bfloat16)"),
            (bias is None or bias.dtype == weight.dtype,
             f"bias is {getattr(bias, 'dtype', None)}, weight {weight.dtype} (must match)"),
            (initial_states is None or initial_states.dtype == x.dtype,
             f"initial_states is {getattr(initial_states, 'dtype', None)}, x {x.dtype} "
             "(must match)"))


class _CausalConv1d(torch.autograd.Function):
    """`causal_conv1d_interface.CausalConv1dFn`: saves x, weight, bias, initial_states."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, return_final_states, activation):
        if x.stride(2) != 1 and x.stride(1) != 1:
            x = x.contiguous()
        out, final = torch.ops.simulated_mamba.conv_fwd(x, weight, bias, initial_states,
                                                        return_final_states)
        ctx.save_for_backward(x, weight, bias, initial_states)
        return (out, final) if return_final_states else out

    @staticmethod
    def backward(ctx, dout, *dfinal):
        x, weight, bias, init = ctx.saved_tensors
        _refuse("causal_conv1d_fn backward", "x", {"x": x, "dout": dout})
        dx, dweight, dbias, dinit = torch.ops.simulated_mamba.conv_bwd(x, weight, bias, dout,
                                                                       init)
        return dx, dweight, _grad(bias, dbias), _grad(init, dinit), None, None


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                     return_final_states=False, final_states_out=None, activation=None):
    """causal-conv1d's `causal_conv1d_fn`: x [b, d, l], weight [d, w] -> [b, d, l]."""
    if seq_idx is not None or final_states_out is not None:
        raise NotImplementedError("simulated causal_conv1d_fn: seq_idx / final_states_out "
                                  "are not modelled")
    _refuse("causal_conv1d_fn", "x", {"x": x, "weight": weight, "bias": bias,
                                      "initial_states": initial_states},
            _conv_checks(x, weight, bias, initial_states))
    return _CausalConv1d.apply(x, weight, bias, initial_states, return_final_states,
                               activation)


class _SplitConvScan(torch.autograd.Function):
    """`MambaSplitConv1dScanCombinedFn` (no non-SSM part): saves zxbcdt, conv weight/bias,
    out_x [b, l, h, p] (the scan's output before the gate or norm), A, D, dt_bias,
    initial_states, rmsnorm_weight, rstd, outproj weight/bias; recomputes the conv in
    backward."""

    @staticmethod
    def forward(ctx, zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size, init, return_final,
                rms_w, proj_w, proj_b, headdim, ngroups, state_fp32):
        b, length, _ = zxbcdt.shape
        h = D.shape[0]
        p = D.shape[1] if D.dim() == 2 else headdim
        dim = h * p
        n = (conv_w.shape[0] - dim) // ngroups // 2
        z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * n, h], dim=-1)
        conv, _ = torch.ops.simulated_mamba.conv_fwd(xBC.transpose(1, 2), conv_w, conv_b,
                                                     None, False)
        x, B, C = conv.transpose(1, 2).split([dim, ngroups * n, ngroups * n], dim=-1)
        zh = z.reshape(b, length, h, p)
        y, out_x, _, final = torch.ops.simulated_mamba.ssd_fwd(
            x.reshape(b, length, h, p), dt, A, B.reshape(b, length, ngroups, n),
            C.reshape(b, length, ngroups, n), chunk_size, None if rms_w is not None else zh,
            state_fp32)
        rstd = None
        if rms_w is None:
            out = y.reshape(b, length, dim)
        else:
            out_x = y
            out, rstd = torch.ops.simulated_mamba.rmsnorm_fwd(
                y.reshape(b * length, dim), rms_w, _rows(z), ngroups)
            out = out.reshape(b, length, dim)
        if proj_w is not None:
            out = torch.nn.functional.linear(out, proj_w, proj_b)
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, out_x, A, D, dt_bias, init, rms_w, rstd,
                              proj_w, proj_b)
        ctx.dims = (h, p, n, ngroups, chunk_size)
        return (out, final) if return_final else out

    @staticmethod
    def backward(ctx, dout, *dfinal):
        zxbcdt, conv_w, conv_b, out_x, A, D, dt_bias, init, rms_w, rstd, proj_w, proj_b = \
            ctx.saved_tensors
        _refuse("mamba_split_conv1d_scan_combined backward", "zxbcdt",
                {"zxbcdt": zxbcdt, "dout": dout})
        h, p, n, g, chunk_size = ctx.dims
        b, length, _ = zxbcdt.shape
        dim = h * p
        z, xBC, dt = zxbcdt.split([dim, dim + 2 * g * n, h], dim=-1)
        conv, _ = torch.ops.simulated_mamba.conv_fwd(xBC.transpose(1, 2), conv_w, conv_b,
                                                     None, False)  # recomputed x, B, C
        x, B, C = conv.transpose(1, 2).split([dim, g * n, g * n], dim=-1)
        dproj_w = dproj_b = drms_w = None
        if proj_w is not None:
            recomputed = out_x.new_empty(b, length, dim)  # the kernel's out_recompute
            dproj_w = torch.einsum("bso,bsd->od", dout, recomputed)
            dproj_b = None if proj_b is None else dout.sum(dim=(0, 1))
            dout = torch.nn.functional.linear(dout, proj_w.t())
        dz = None
        if rms_w is not None:
            dy, drms_w, dz = torch.ops.simulated_mamba.rmsnorm_bwd(
                _rows(dout), out_x.reshape(b * length, dim), rms_w, _rows(z), rstd)
            dout = dy
        grads = torch.ops.simulated_mamba.ssd_bwd(
            dout.reshape(b, length, h, p), x.reshape(b, length, h, p), dt, A,
            B.reshape(b, length, g, n), C.reshape(b, length, g, n), chunk_size, D,
            None if rms_w is not None else z.reshape(b, length, h, p), dt_bias, init)
        dx, ddt, dA, dB, dC, dD, dz_scan, ddt_bias, dinit = grads
        dz = dz_scan if dz is None else dz
        dxBC = torch.cat([dx.reshape(b, length, dim), dB.reshape(b, length, -1),
                          dC.reshape(b, length, -1)], dim=-1)
        dxBC, dconv_w, dconv_b, _ = torch.ops.simulated_mamba.conv_bwd(
            xBC.transpose(1, 2), conv_w, conv_b, dxBC.transpose(1, 2), None)
        dzxbcdt = torch.cat([dz.reshape(b, length, dim), dxBC.transpose(1, 2), ddt], dim=-1)
        return (dzxbcdt, dconv_w, _grad(conv_b, dconv_b), ddt_bias, dA, dD, None,
                _grad(init, dinit), None, drms_w, dproj_w, dproj_b, None, None, None)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D,
                                     chunk_size, initial_states=None, seq_idx=None,
                                     dt_limit=(0.0, float("inf")), return_final_states=False,
                                     activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6,
                                     outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True, state_dtype=None):
    """mamba-ssm's `mamba_split_conv1d_scan_combined` (shapes in `ops.`'s docstring)."""
    if seq_idx is not None:
        raise NotImplementedError("simulated mamba_split_conv1d_scan_combined: seq_idx "
                                  "(packed sequences) is not modelled")
    if D.dim() == 1 and headdim is None:
        raise ValueError("headdim is required when D is 1-D")
    h = D.shape[0]
    p = D.shape[1] if D.dim() == 2 else headdim
    n = (conv1d_weight.shape[0] - h * p) // ngroups // 2
    if zxbcdt.shape[-1] != 2 * h * p + 2 * ngroups * n + h:
        raise NotImplementedError("simulated mamba_split_conv1d_scan_combined: a non-SSM "
                                  "part of zxbcdt (d_nonssm > 0) is not modelled")
    _refuse("mamba_split_conv1d_scan_combined", "zxbcdt", {
        "zxbcdt": zxbcdt, "conv1d_weight": conv1d_weight, "conv1d_bias": conv1d_bias,
        "dt_bias": dt_bias, "A": A, "D": D, "initial_states": initial_states,
        "rmsnorm_weight": rmsnorm_weight, "outproj_weight": outproj_weight,
        "outproj_bias": outproj_bias}, _conv_checks(zxbcdt, conv1d_weight, conv1d_bias, None))
    return _SplitConvScan.apply(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                initial_states, return_final_states, rmsnorm_weight,
                                outproj_weight, outproj_bias, p, ngroups,
                                state_dtype in (None, torch.float32))


@contextlib.contextmanager
def fused_mamba_kernels():
    """Bind the stand-ins into Megatron's `mamba_mixer` where `adapter.select_kernels` binds
    mamba-ssm's kernels (the decode kernels stay the torch ops), and report the choice as
    `adapter.MAMBA_SSM`; everything is restored on exit. Enter it before the model is built
    (the mixer builds its norm from `ExtendedRMSNorm`)."""
    from megatron.core.ssm import mamba_mixer as mm

    from megatron_rlp.models.mamba import adapter

    before = {name: getattr(mm, name) for name in adapter._BOUND}
    choice = adapter._choice
    adapter.select_kernels()  # binds the torch path (and Megatron's own globals) once
    norm = type("ExtendedRMSNorm", (RMSNormGated,),
                {"sharded_state_dict": adapter._sharded_state_dict})
    stand_ins = {"RMSNormGated": RMSNormGated, "ExtendedRMSNorm": norm,
                 "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
                 "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined,
                 "causal_conv1d_fn": causal_conv1d_fn}
    try:
        for name, value in stand_ins.items():
            setattr(mm, name, value)
        adapter._choice = adapter.MAMBA_SSM
        yield
    finally:
        for name, value in before.items():
            setattr(mm, name, value)
        adapter._choice = choice
