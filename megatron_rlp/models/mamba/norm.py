"""Grouped, gated RMSNorm in plain PyTorch, standing in for
`mamba_ssm.ops.triton.layernorm_gated` (`rmsnorm_fn`, `RMSNorm`) on machines without it.
Re-exported by `ops.py`, whose table lists every stand-in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_rlp.models.mamba.elementwise import compute_dtype


def rmsnorm_fn(x: Tensor, weight: Tensor, bias: Tensor | None = None, z: Tensor | None = None,
               eps: float = 1e-6, group_size: int | None = None,
               norm_before_gate: bool = True) -> Tensor:
    """RMSNorm over groups of `group_size` channels, gated by silu(z).

    norm_before_gate=True: norm(x) * silu(z); False (Megatron's mixer): norm(x * silu(z)).
    """
    cd = compute_dtype(x, weight)
    xf = x.to(cd)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(cd))
    d = xf.shape[-1]
    gs = group_size or d
    xg = xf.reshape(*xf.shape[:-1], d // gs, gs)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    out = xg.reshape(xf.shape) * weight.to(cd)
    if bias is not None:
        out = out + bias.to(cd)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(cd))
    return out.to(x.dtype)


class RMSNormGated(torch.nn.Module):
    """`mamba_ssm.ops.triton.layernorm_gated.RMSNorm`: weight only (ones), grouped, gated."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps,
                          group_size=self.group_size, norm_before_gate=self.norm_before_gate)
