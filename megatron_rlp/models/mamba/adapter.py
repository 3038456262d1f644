"""Let Megatron's own `MambaMixer` run where `mamba_ssm` does not import (CPU, CI).

`megatron.core.ssm.mamba_mixer` binds its kernels as module globals at import time. Without
`mamba_ssm` it sets `HAVE_MAMBA_SSM = False` (the mixer then refuses to construct), makes
its gated norm `ExtendedRMSNorm` a subclass of a `MagicMock`, and imports Megatron's Triton
decode kernels, which cannot run on CPU tensors. `install_torch_kernels()` rebinds exactly
those globals to the pure-torch kernels in `ops.py`:

| global in mamba_mixer | becomes |
|---|---|
| `HAVE_MAMBA_SSM` | True |
| `mamba_chunk_scan_combined`, `mamba_split_conv1d_scan_combined` | `ops.*` (chunk <= 32 on CPU) |
| `RMSNormGated`, `ExtendedRMSNorm` | `ops.RMSNormGated` (+ Megatron's `sharded_state_dict`) |
| `causal_conv1d_update` (Triton, channel-last) | `ops.causal_conv1d_update` behind a transpose |
| `selective_state_update` (Triton) | `ops.selective_state_update` |
| `causal_conv1d_fn` | None: the mixer's own `F.conv1d` path |

Nothing else in Megatron changes. Where `mamba_ssm` imports (GPU runs) this is a no-op and
the CUDA/Triton kernels stay in place. It is called by `local_spec.local_hybrid_stack_spec`
whenever the layer pattern has Mamba (`M`) layers, i.e. before any mixer is built.
"""

from __future__ import annotations

import logging

from torch import Tensor

from megatron_rlp.models.mamba import ops

logger = logging.getLogger(__name__)

_INSTALLED = False

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


def torch_kernels_installed() -> bool:
    """True once `install_torch_kernels()` replaced the missing mamba_ssm kernels."""
    return _INSTALLED


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


class ExtendedRMSNorm(ops.RMSNormGated):
    """Megatron's `ExtendedRMSNorm` (gated RMSNorm with a TP-sharded state dict) on the torch
    norm. Without mamba_ssm Megatron's class is a `MagicMock` instance (it subclassed one), so
    its `sharded_state_dict` is restated here: weight sharded on axis 0."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        if not hasattr(self, "tp_group"):
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"])


def install_torch_kernels() -> bool:
    """Bind the pure-torch kernels into `megatron.core.ssm.mamba_mixer` if `mamba_ssm` is
    missing. Idempotent. Returns True when the torch kernels are (now) in use."""
    global _INSTALLED
    from megatron.core.ssm import mamba_mixer as mm

    if _INSTALLED:
        return True
    if mm.HAVE_MAMBA_SSM:
        return False  # real kernels: leave Megatron exactly as shipped

    mm.RMSNormGated = ops.RMSNormGated
    mm.ExtendedRMSNorm = ExtendedRMSNorm
    mm.mamba_chunk_scan_combined = _chunk_scan
    mm.mamba_split_conv1d_scan_combined = _split_conv1d_scan
    mm.causal_conv1d_fn = None
    mm.causal_conv1d_update = _conv_update_channel_last
    mm.selective_state_update = ops.selective_state_update
    mm.HAVE_MAMBA_SSM = True
    _INSTALLED = True
    logger.info("mamba_ssm not importable: Megatron's MambaMixer uses the pure-torch Mamba-2 "
                "kernels (megatron_rlp.models.mamba.ops)")
    return True
