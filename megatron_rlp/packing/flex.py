"""Block-sparse core attention for the branch-packed update: FlexAttention with a `BlockMask`.

The packed update's tree mask (`packing.tree`) leaves most (query, key) pairs masked once a
window carries several branches: a branch reads its prefix and itself, never the other
branches. Megatron's attention kernels take the mask as a dense [B, 1, S, S] tensor and compute
every masked block anyway. PyTorch's FlexAttention (`torch.nn.attention.flex_attention`)
skips whole (query block, key block) tiles that a `BlockMask` marks empty and applies the mask
only inside partially masked tiles, so its cost follows the tree, not S^2.

How it is wired (and why this way). Core attention has no weights, so nothing in the model
specs changes: `route_core_attention(model)` wraps the `forward` of every attention layer's
`core_attention` (Megatron's local `DotProductAttention` or TE's `TEDotProductAttention`;
both take `query [sq, b, np, hn]`, `key/value [sk, b, ng, hn]` and return `[sq, b, np*hn]`).
The wrapper is transparent: it calls the original forward unless the `attention_mask`
argument is a *tree descriptor* ([B, 3, S] long: branch, lo, hi per token, `tree_descriptors`)
instead of Megatron's boolean mask. The packed forward passes the descriptor as the model's
`attention_mask`, so it travels the way Megatron's mask does: through the layers, the pipeline
stage's forward, and the saved inputs of activation recomputation (selective or full), which
run the wrapper again in the backward pass after any context manager would have exited. The
BlockMask of a descriptor is built once per micro-batch (`tree_block_mask`) and cached, keyed
by the descriptor's storage (the cache holds the tensor, so the key cannot be reused while
cached); a recompute that misses the cache rebuilds it from the descriptor.

What is handled:
- GQA: keys/values keep their `ng` groups (`enable_gqa`), no repeat as Megatron's does.
- TP: the wrapper sees this rank's heads (np, ng per partition), as Megatron's kernel does;
  sequence parallel gathers the sequence before core attention, so S is whole.
- Scale: Megatron's `config.softmax_scale`, else 1/sqrt(kv_channels) (both kernels' default).
- Refused (ValueError): attention dropout > 0 in training, `apply_query_key_layer_scaling`,
  a softmax other than `vanilla`, sliding-window attention, packed THD params, bias.
- Masked-out rows (padding tokens read nothing) give 0 here and a uniform average under
  Megatron's -10000 fill; their outputs are never read by the loss.

Where it runs: on CUDA `flex_attention` and `create_block_mask` run under `torch.compile`
(inductor: PyTorch's fused block-sparse Triton kernel; eager flex materialises the scores).
The packed width S varies from step to step, so the compiled path pads it up to a multiple of
`BLOCK_SIZE` (padding tokens: `tree.PAD`, they attend and are attended by nothing; their
outputs are dropped) and compiles with static shapes: one compilation per padded width, not
per step. Every compilation is counted (`compile_count`, the `flex_compiles` metric). On CPU,
`flex_attention` refuses inputs that need gradients (a device policy check; inductor has no
CPU backward for it): the CPU path calls the same FlexAttention operator
(`torch._higher_order_ops.flex_attention`) eagerly, whose math implementation applies the
mask_mod densely. It exists for tests and debugging: it proves the mask_mod, GQA, scale and
layout plumbing against the explicit-mask path; the block structure the CUDA kernel skips by
is checked separately (`dense_from_block_mask` against `tree.tree_mask`). With
`compile_on_cpu = True` (the kernel tests) a CPU forward that needs no gradients takes the
compiled path, inductor's C++ FlexAttention template, as a GPU run compiles it.
`model.packed_attention` selects the path (`resolve`).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
from torch import Tensor

from megatron_rlp.models.masked_attention import wrap_core_attentions
from megatron_rlp.packing.tree import PAD, WINDOW, tree_mask

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    HAVE_FLEX = True
except ImportError:  # pragma: no cover - the pinned torch has it
    BlockMask = create_block_mask = flex_attention = None
    HAVE_FLEX = False

BLOCK_SIZE = 128  # FlexAttention's default tile (query and key), what its CUDA kernel uses
_CACHE_SIZE = 16  # micro-batches in flight (pipeline 1F1B keeps up to PP forwards live)
_block_masks: OrderedDict[tuple, tuple[Tensor, BlockMask]] = OrderedDict()
compile_on_cpu = False  # CPU forwards without gradients take the compiled path (module doc)
_compiles = 0  # inductor compilations of the compiled path (first ones and recompiles)


def resolve(kind: str, device_type: str, pattern: str) -> str:
    """The packed update's attention path: `auto` -> `flex` on CUDA (attention-only
    patterns), `split` on CPU (`packing.split_attention`, measured faster than `mask` there,
    docs/performance.md), `mask` elsewhere; `flex`/`mask`/`split` as given.

    Raises:
        ValueError: `flex` without FlexAttention in this torch, or with Mamba (`M`) layers
            (the descriptor would reach layers that expect Megatron's mask); the message
            says what flex needs.
    """
    if kind == "auto":
        if device_type == "cuda" and HAVE_FLEX and "M" not in pattern:
            return "flex"
        return "split" if device_type == "cpu" else "mask"
    if kind == "flex" and not HAVE_FLEX:
        raise ValueError("torch.nn.attention.flex_attention (torch >= 2.5)")
    if kind == "flex" and "M" in pattern:
        raise ValueError(f"an attention-only model.hybrid_layer_pattern (no M), got {pattern!r}")
    return kind


def tree_descriptors(branch: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The packed micro-batch's per-token tree ([B, S] each, `packing.tree`) as one [B, 3, S]
    long tensor: what the packed forward passes as `attention_mask` on the flex path."""
    return torch.stack([branch, lo, hi], dim=1).long()


def is_tree_descriptor(mask) -> bool:
    """Whether an `attention_mask` argument is a tree descriptor (Megatron's masks are bool)."""
    return (isinstance(mask, Tensor) and mask.dim() == 3 and mask.shape[1] == 3
            and not mask.dtype.is_floating_point and mask.dtype != torch.bool)


def tree_mask_mod(descriptor: Tensor):
    """FlexAttention `mask_mod(b, h, q, kv) -> bool` (True = attend) of `tree.tree_mask`:
    key kv is a window token in [lo[q], hi[q]), or q and kv are in one branch and kv <= q."""
    branch, lo, hi = descriptor.unbind(1)

    def mask_mod(b, h, q, kv):
        window = (branch[b, kv] == WINDOW) & (kv >= lo[b, q]) & (kv < hi[b, q])
        same = (branch[b, q] == branch[b, kv]) & (branch[b, q] >= 0) & (kv <= q)
        return window | same

    return mask_mod


def pad_descriptor(descriptor: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """[B, 3, S] -> [B, 3, S'] with S' the next multiple of `block_size`; the new tokens are
    padding (branch `PAD`, lo = hi = 0): they attend nothing and nothing attends them."""
    extra = -descriptor.shape[2] % block_size
    if not extra:
        return descriptor
    fill = descriptor.new_tensor([PAD, 0, 0])[None, :, None]
    return torch.cat([descriptor, fill.expand(descriptor.shape[0], 3, extra)], dim=2)


def tree_block_mask(descriptor: Tensor, block_size: int = BLOCK_SIZE, *,
                    compiled: bool = False) -> BlockMask:
    """The BlockMask of a [B, 3, S] tree descriptor (heads broadcast), on its device.

    Built with `create_block_mask`, under `torch.compile` when `compiled` (the CUDA path: the
    S x S mask is never materialised there; S is then padded to a multiple of `block_size`,
    `pad_descriptor`), and cached per descriptor storage; `block_size` is the query and key
    tile.
    """
    key = (descriptor.data_ptr(), tuple(descriptor.shape), descriptor.device, block_size,
           compiled)
    hit = _block_masks.get(key)
    if hit is not None:
        _block_masks.move_to_end(key)
        return hit[1]
    tree = pad_descriptor(descriptor, block_size) if compiled else descriptor
    b, _, s = tree.shape
    make = _compiled(create_block_mask) if compiled else create_block_mask
    block_mask = make(tree_mask_mod(tree), b, None, s, s, device=tree.device,
                      BLOCK_SIZE=block_size)
    _block_masks[key] = (descriptor, block_mask)
    while len(_block_masks) > _CACHE_SIZE:
        _block_masks.popitem(last=False)
    return block_mask


def _compiled_path(device: torch.device, needs_grad: bool) -> bool:
    return device.type != "cpu" or (compile_on_cpu and not needs_grad)


def block_mask_for(descriptor: Tensor, needs_grad: bool | None = None) -> BlockMask:
    """The BlockMask the attention layers of a packed forward use for `descriptor`: compiled
    and padded on the compiled path (CUDA; CPU forwards without gradients under
    `compile_on_cpu`), eager otherwise. `needs_grad` defaults to `torch.is_grad_enabled()`."""
    needs_grad = torch.is_grad_enabled() if needs_grad is None else needs_grad
    return tree_block_mask(descriptor, compiled=_compiled_path(descriptor.device, needs_grad))


def _blocks_dense(num: Tensor, indices: Tensor | None, kv_blocks: int) -> Tensor:
    """[B, H, nq] block counts + [B, H, nq, max] block indices -> [B, H, nq, nk] bool."""
    if indices is None:
        return torch.zeros(*num.shape, kv_blocks, dtype=torch.bool, device=num.device)
    valid = torch.arange(indices.shape[-1], device=num.device) < num[..., None]
    out = torch.zeros(*num.shape, kv_blocks + 1, dtype=torch.bool, device=num.device)
    out.scatter_(-1, torch.where(valid, indices.long(), kv_blocks), valid)
    return out[..., :kv_blocks]


def block_tables(block_mask: BlockMask) -> tuple[Tensor, Tensor]:
    """(partial, full): [B, H, nq, nk] bool tiles the kernel computes with the mask_mod, and
    tiles it computes unmasked. Every other tile is skipped."""
    nk = -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1])
    partial = _blocks_dense(block_mask.kv_num_blocks, block_mask.kv_indices, nk)
    full = _blocks_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk) \
        if block_mask.full_kv_num_blocks is not None else torch.zeros_like(partial)
    return partial, full


def block_sparsity(block_mask: BlockMask) -> float:
    """Fraction of (batch, query tile, key tile) that FlexAttention skips, in [0, 1]."""
    partial, full = block_tables(block_mask)
    return 1.0 - float((partial | full).sum()) / partial.numel()


def dense_from_block_mask(block_mask: BlockMask) -> Tensor:
    """What the block-sparse kernel attends: [B, 1, S, S] bool, True = attend. Skipped tiles
    are False, full tiles True, partial tiles the mask_mod (the semantics of FlexAttention's
    kernel). Equal to `~tree.tree_mask` when the BlockMask is right."""
    q_len, kv_len = block_mask.seq_lengths
    bq, bk = block_mask.BLOCK_SIZE
    partial, full = block_tables(block_mask)
    b = partial.shape[0]

    def expand(t: Tensor) -> Tensor:
        return t.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :q_len, :kv_len]

    bi, qi, ki = torch.meshgrid(torch.arange(b), torch.arange(q_len), torch.arange(kv_len),
                                indexing="ij")
    mod = block_mask.mask_mod(bi, torch.zeros_like(bi), qi, ki)[:, None]
    return expand(full) | (expand(partial) & mod)


def packed_sparsity(branch: Tensor, lo: Tensor, hi: Tensor,
                    block_size: int = BLOCK_SIZE) -> dict[str, float]:
    """Sparsity of a packed micro-batch ([B, S] descriptors): `block` = tiles FlexAttention
    skips at `block_size`, `pair` = (query, key) pairs the tree mask masks (the bound)."""
    descriptor = tree_descriptors(branch, lo, hi)
    block_mask = create_block_mask(tree_mask_mod(descriptor), descriptor.shape[0], None,
                                   descriptor.shape[2], descriptor.shape[2],
                                   device=descriptor.device, BLOCK_SIZE=block_size)
    pair = float(tree_mask(branch, lo, hi).float().mean())
    return {"block": block_sparsity(block_mask), "pair": pair}


def compile_count() -> int:
    """Inductor compilations of the compiled flex path in this process (first compilations
    and recompiles of `flex_attention` and `create_block_mask`): the `flex_compiles` metric."""
    return _compiles


def _counting_inductor(graph, example_inputs):
    """torch.compile backend: inductor (`compile_fx`, what `backend="inductor"` runs), counted."""
    from torch._inductor.compile_fx import compile_fx

    global _compiles
    _compiles += 1
    return compile_fx(graph, example_inputs)


@functools.cache
def _compiled(fn):
    """`fn` under torch.compile with static shapes (padded widths: one graph per width)."""
    return torch.compile(fn, backend=_counting_inductor, dynamic=False)


def _flex_cpu(query: Tensor, key: Tensor, value: Tensor, block_mask: BlockMask,
              scale: float) -> Tensor:
    """FlexAttention's operator, eager, on CPU with gradients (`flex_attention` refuses those
    with a device check; the operator's math path computes them). Tests and debugging only."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op
    from torch.nn.attention.flex_attention import _apply_kernel_options, _identity

    options = _apply_kernel_options(query, key, value, False, None, None)
    out, _, _ = flex_op(query, key, value, _identity, block_mask.as_tuple(), scale, options)
    return out


def flex_tree_attention(query: Tensor, key: Tensor, value: Tensor, descriptor: Tensor,
                        scale: float) -> Tensor:
    """Tree-masked attention in Megatron's layout.

    Args:
        query: [sq, b, np, hn]; key, value: [sk, b, ng, hn] (np a multiple of ng: GQA).
        descriptor: [b, 3, sq] tree descriptor (`tree_descriptors`), sq == sk.
        scale: softmax scale applied to q.k.

    Returns:
        [sq, b, np * hn], Megatron's core-attention output.
    """
    sq, b, heads, hn = query.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    block_mask = block_mask_for(descriptor, needs_grad)
    if not _compiled_path(q.device, needs_grad):
        return _flex_cpu(q, k, v, block_mask, scale).permute(2, 0, 1, 3).reshape(
            sq, b, heads * hn)
    pad = block_mask.seq_lengths[0] - sq  # widths padded to the tile (pad_descriptor)
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    out = _compiled(flex_attention)(q, k, v, block_mask=block_mask, scale=scale,
                                    enable_gqa=heads != k.shape[1])
    return out[:, :, :sq].permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def check_supported(core: torch.nn.Module, path: str = "flex") -> float:
    """The softmax scale of `core`'s config; ValueError for what the packed attention `path`
    (`flex`, or `split`: `packing.split_attention`) does not do."""
    c = core.config
    dropout = c.attention_dropout if core.training else 0.0
    for bad, what in ((dropout > 0, f"attention_dropout={c.attention_dropout}"),
                      (c.apply_query_key_layer_scaling, "apply_query_key_layer_scaling"),
                      (getattr(c, "softmax_type", "vanilla") != "vanilla",
                       f"softmax_type={getattr(c, 'softmax_type', None)}"),
                      (getattr(c, "window_size", None) is not None, "window_size")):
        if bad:
            raise ValueError(f"the {path} packed attention does not support {what}; use "
                             "model.packed_attention=mask")
    return c.softmax_scale or 1.0 / math.sqrt(c.kv_channels)


def _routed_forward(core: torch.nn.Module, original, query, key, value, attention_mask,
                    attn_mask_type=None, attention_bias=None, packed_seq_params=None, **kw):
    if not is_tree_descriptor(attention_mask):
        return original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                        attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                        **kw)
    if attention_bias is not None or packed_seq_params is not None or kw:
        raise ValueError("the flex packed attention takes no attention bias or packed "
                         "sequence params")
    return flex_tree_attention(query, key, value, attention_mask, check_supported(core))


def route_core_attention(model) -> int:
    """Let every attention's `core_attention` of `model` (a module or a list of pipeline
    chunks) take a tree descriptor as `attention_mask` (see module doc); idempotent and
    transparent for Megatron's own masks. Returns the number of modules routed."""
    return wrap_core_attentions(model, "_rlp_flex_original", _routed_forward)
