"""Fused-attention stand-ins for `tools/simulate_gpu.py`: the memory and FLOPs of the kernels a
GPU runs, on fake CUDA tensors.

On a GPU the packed update's core attention is FlexAttention (`packing/flex.py`,
`model.packed_attention=flex`, what `auto` resolves to for an attention-only recipe on CUDA):
`torch.compile(flex_attention)` generates one fused block-sparse Triton kernel, which keeps
for backward only q, k, v, the output and the fp32 log-sum-exp ([B, heads, S]), and never
holds a score matrix. That compiled kernel is a higher-order op that the simulation's stack of
dispatch modes (FakeTensorMode, the value shadows, the memory tracker, the FLOP counter)
cannot run: Dynamo does not trace fake tensors of an outer mode. Without a stand-in the
simulation had to run another path (`split`, plain torch ops that keep the [T, W] and [T, T]
fp32 softmax output and bf16 probabilities): 23 GiB more for Qwen3's update (57 vs 34 GiB).

`fused_attention()` replaces exactly the two compiled calls of `packing/flex.py` (its
`_compiled(fn)`), and nothing else on that path:

- `_compiled(flex_attention)` becomes PyTorch's own eager `flex_attention` wrapper, so every
  check FlexAttention makes in Python runs for real (q/k/v devices, head and batch layout,
  GQA, the BlockMask's shape and device), with only its kernel call (`flex_attention_hop`)
  replaced by `FusedAttention`;
- `_compiled(create_block_mask)` builds the BlockMask as eager `create_block_mask` does
  (the mask_mod over every (query, key), reduced to tiles by PyTorch's own
  `_convert_mask_to_block_mask`), by broadcasting instead of `vmap`; its values come from
  the descriptor's host shadows, so the number of (query, key) pairs the tree reads is
  exact. It materialises a transient [B, 1, S, S] bool (the compiled one does not): ~22 MB
  for Qwen3, built before the forward, far from the update's peak.

`FusedAttention` is a `torch.autograd.Function` over two custom ops
(`simulated_attention::fused_fwd/fused_bwd`) that have only fake implementations. Its forward
returns the output ([B, Hq, S, D], q's dtype) and the lse ([B, Hq, S] fp32) and saves exactly
q, k, v, out, lse; its backward allocates FlashAttention's fp32 row workspace (delta,
[B, Hq, S]) and returns dq, dk, dv shaped and typed as q, k, v (GQA: k, v keep their groups).
Both refuse, as the kernel does, q/k/v (and, backward, dout) on different devices or of
different dtypes, a non-float dtype, or different head dims; under the simulation the refusal
is one `error:` line naming the op, its tensors and the caller's file:line. FLOPs
(`torch.utils.flop_counter.register_flop_formula`, FlashAttention's accounting):
4 x head_dim x Hq per (query, key) pair the mask reads, forward; 2.5 times that, backward.

`model.packed_attention=split` (kept for comparison, and what the hybrid recipes simulate
with) calls `F.scaled_dot_product_attention(is_causal=True)` for the window; on fake CUDA
PyTorch picks the math kernel there, which keeps [W, W] scores for backward. While the stand-in
is active an SDPA call that the flash kernel would take on a GPU (CUDA, fp16/bf16, no mask,
no dropout, head dim <= 256) goes to `FusedAttention` too (pairs: the causal triangle, top-left
aligned as PyTorch's `is_causal`); any other call runs PyTorch's SDPA unchanged.

What it proves: that the recipe's GPU attention path runs at full size with the right
shapes, devices and dtypes through FlexAttention's own checks, and what the fused kernel
keeps (its memory) and computes (its FLOPs). What it does not: the kernel's numerics, its
tiling, its speed, or that inductor compiles it (values are fake; tests/unit/test_packed_flex.py
proves the flex path equal to the explicit mask on CPU, and `tools/gpu_check_kernels.py` runs
the real kernel where a GPU is lent). Written here, not in the package: it exists only for the
fake-tensor simulation, and neither PyTorch nor Megatron has a fake-tensor FlexAttention that
runs outside `torch.compile`.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakIdKeyDictionary

_LIB = torch.library.Library("simulated_attention", "DEF")  # noqa: TOR901 fake-only ops
_LIB.define("fused_fwd(Tensor q, Tensor k, Tensor v, int pairs) -> (Tensor, Tensor)")
_LIB.define("fused_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
            "int pairs) -> (Tensor, Tensor, Tensor)")
_FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2's largest head dim (what SDPA's flash takes)
_pairs: WeakIdKeyDictionary = WeakIdKeyDictionary()  # BlockMask.kv_num_blocks -> pairs read


def check_inputs(*tensors: Tensor) -> None:
    """The fused kernels' input checks: one device, one float dtype, 4-D, one head dim.

    Raises:
        RuntimeError: naming the first tensor that differs from the query (the first).
    """
    q = tensors[0]
    if not q.dtype.is_floating_point or q.dtype == torch.float64:
        raise RuntimeError(f"fused attention takes fp16, bf16 or fp32 inputs, got query "
                           f"{q.dtype}")
    names = ("query", "key", "value", "output gradient")
    for name, t in zip(names, tensors, strict=False):
        if t.device != q.device:
            raise RuntimeError(f"fused attention: query on {q.device}, {name} on {t.device}")
        if t.dtype != q.dtype:
            raise RuntimeError(f"fused attention: query is {q.dtype}, {name} is {t.dtype}")
        if t.dim() != 4 or t.shape[-1] != q.shape[-1]:
            raise RuntimeError(f"fused attention: query {list(q.shape)}, {name} "
                               f"{list(t.shape)} (want [B, heads, S, head_dim])")
    k = tensors[1]
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0]:
        raise RuntimeError(f"fused attention: query {list(q.shape)}, key {list(k.shape)} "
                           "(query heads a multiple of key heads, one batch)")


@torch.library.register_fake("simulated_attention::fused_fwd")
def _fused_fwd(q, k, v, pairs):
    check_inputs(q, k, v)
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("simulated_attention::fused_bwd")
def _fused_bwd(dout, q, k, v, out, lse, pairs):
    check_inputs(q, k, v, dout)
    if lse.dtype != torch.float32 or lse.device != q.device:
        raise RuntimeError(f"fused attention: lse must be fp32 on {q.device}, got {lse.dtype} "
                           f"on {lse.device}")
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@register_flop_formula(torch.ops.simulated_attention.fused_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, pairs, *args, **kwargs) -> int:
    return 4 * pairs * q_shape[1] * q_shape[-1]  # QK^T and PV: 2 x 2 x head_dim per pair


@register_flop_formula(torch.ops.simulated_attention.fused_bwd)
def _bwd_flops(dout_shape, q_shape, k_shape, v_shape, o_shape, lse_shape, pairs, *args,
               **kwargs) -> int:
    return 10 * pairs * q_shape[1] * q_shape[-1]  # 2.5 x forward (QK^T again + 4 GEMMs)


class FusedAttention(torch.autograd.Function):
    """A fused attention kernel's memory: forward (q, k, v [B, H, S, D], pairs: the (query,
    key) pairs the mask reads, over the batch) -> (out [B, Hq, S, D], lse [B, Hq, S] fp32);
    saves q, k, v, out, lse; backward -> dq, dk, dv (module docstring)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pairs: int):
        out, lse = torch.ops.simulated_attention.fused_fwd(q, k, v, pairs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pairs = pairs
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        delta = torch.empty_like(lse)  # rowsum(dout * out), FlashAttention's bwd workspace
        dq, dk, dv = torch.ops.simulated_attention.fused_bwd(dout, q, k, v, out, lse,
                                                              ctx.pairs)
        del delta
        return dq, dk, dv, None


def _flex_kernel(query, key, value, score_mod, block_mask, scale, kernel_options, *rest):
    """`flex_attention_hop`'s stand-in: (out, lse, max_scores) as the HOP returns them."""
    counts = block_mask[2]  # BlockMask.as_tuple(): (q_len, kv_len, kv_num_blocks, ...)
    pairs = _pairs.get(counts)
    if pairs is None:  # a BlockMask not built by the stand-in: every pair (dense bound)
        pairs = query.shape[0] * query.shape[-2] * key.shape[-2]
    out, lse = FusedAttention.apply(query, key, value, pairs)
    return out, lse, lse.new_empty(0)  # max scores: not requested, not computed


def _block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=128, **_):
    """Eager `create_block_mask`'s result for `mask_mod`, by broadcasting (module docstring);
    records the number of pairs the mask reads for `_flex_kernel`'s FLOPs."""
    from torch.nn.attention import flex_attention as fa

    b = torch.arange(B or 1, device=device)[:, None, None, None]
    h = torch.zeros((), dtype=torch.long, device=device)
    q = torch.arange(Q_LEN, device=device)[None, None, :, None]
    kv = torch.arange(KV_LEN, device=device)[None, None, None, :]
    mask = mask_mod(b, h, q, kv).expand(B or 1, 1, Q_LEN, KV_LEN)
    pairs = int(mask.sum())  # per head: the tree's mask_mod broadcasts over heads (H None)
    size = BLOCK_SIZE if isinstance(BLOCK_SIZE, tuple) else (BLOCK_SIZE, BLOCK_SIZE)
    blocks = fa._convert_mask_to_block_mask(mask, size[0], size[1], separate_full_blocks=True)
    del mask
    block_mask = fa._create_sparse_block_from_block_mask(blocks, mask_mod, (Q_LEN, KV_LEN),
                                                         size[0], size[1])
    _pairs[block_mask.kv_num_blocks] = pairs
    return block_mask


def _causal_pairs(batch: int, q_len: int, kv_len: int, causal: bool) -> int:
    """Pairs of SDPA's mask: all, or the top-left causal triangle (`is_causal`)."""
    if not causal:
        return batch * q_len * kv_len
    full = max(q_len - kv_len, 0)  # rows past the last key read every key
    rows = q_len - full
    return batch * (rows * (rows + 1) // 2 + full * kv_len)


def _flash_takes(query, attn_mask, dropout_p) -> bool:
    return (query.device.type == "cuda" and attn_mask is None and dropout_p == 0.0
            and query.dtype in (torch.float16, torch.bfloat16) and query.dim() == 4
            and query.shape[-1] <= _FLASH_MAX_HEAD_DIM)


def _one_line(what: str, tensors, error: Exception):
    from simulated_values import SimulationError, describe_op_error

    return SimulationError(describe_op_error(what, list(tensors), error))


@contextlib.contextmanager
def fused_attention():
    """While active: `packing.flex`'s compiled FlexAttention and BlockMask run as the
    stand-ins above, and SDPA calls the flash kernel would take run as `FusedAttention`.
    A device/dtype refusal raises `simulated_values.SimulationError` (one line)."""
    from torch.nn.attention import flex_attention as fa

    from megatron_rlp.packing import flex
    from megatron_rlp.packing import forward as packed

    sdpa = F.scaled_dot_product_attention

    def eager_flex(query, key, value, *args, **kwargs):
        try:
            return fa.flex_attention(query, key, value, *args, **kwargs)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if type(e).__name__ == "SimulationError":
                raise
            raise _one_line("flex_attention", (query, key, value), e) from None

    def compiled(fn):
        if fn is fa.flex_attention:
            return eager_flex
        if fn is fa.create_block_mask:
            return _block_mask
        raise NotImplementedError(f"no simulated stand-in for torch.compile({fn})")

    def fresh_block_mask(descriptor, needs_grad=None):
        # Fake tensors share data_ptr 0, the BlockMask cache's key: on a GPU a new
        # micro-batch's descriptor never hits an old entry, so none may hit here.
        flex._block_masks.clear()
        return original_block_mask_for(descriptor, needs_grad)

    def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False):
        if not _flash_takes(query, attn_mask, dropout_p):
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        try:
            if not enable_gqa and key.dim() == 4 and key.shape[1] != query.shape[1]:
                raise RuntimeError(f"query heads {query.shape[1]} != key heads "
                                   f"{key.shape[1]} without enable_gqa")
            check_inputs(query, key, value)
        except RuntimeError as e:
            raise _one_line("scaled_dot_product_attention", (query, key, value), e) from None
        pairs = _causal_pairs(query.shape[0], query.shape[-2], key.shape[-2], is_causal)
        return FusedAttention.apply(query, key, value, pairs)[0]

    original_block_mask_for = packed.block_mask_for
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(flex, "_compiled", compiled))
        stack.enter_context(mock.patch.object(packed, "block_mask_for", fresh_block_mask))
        stack.enter_context(mock.patch.object(fa, "flex_attention_hop", _flex_kernel))
        stack.enter_context(mock.patch.object(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG",
                                              True))
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", fused_sdpa))
        yield
