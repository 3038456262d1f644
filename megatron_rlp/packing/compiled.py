"""A compiled decode step over a static cache (`rlp.compile_decode`).

A rollout's decode step at small model sizes is per-op overhead: Megatron's module tree, the
linear layers' autograd functions and a few dozen small kernels per layer (`tools/
profile_rollout.py`: about a third of the step is Python and dispatch between ops). Here the
model forward of one decode token runs under `torch.compile` (inductor; on CUDA with
`triton.cudagraphs`, what `mode="reduce-overhead"` sets), which traces Megatron's own
modules into one graph per shape and fuses their elementwise work. The sampler's math (keyed
Gumbel noise over the vocabulary, log-softmax) and S_pred's log-prob are compiled the same
way.

Shapes stay static, so the number of graphs is bounded:
- the cache is static: decode attention (`static_decode_attention`) reads the whole
  [max_seq] (plain) or [T] (cascade thought) cache with future columns masked, and takes the
  decode position from a 0-d tensor (`ctx.decode_pos`), so no shape or Python int changes
  from one step to the next;
- the decode batch only takes bucket sizes: R = C x G after the fork, then powers of two
  below it (`bucket_rows`); compaction keeps finished rows as filler up to the bucket
  (decoding a finished row is harmless: it records nothing, and keyed sampling makes the
  thoughts independent of which rows are decoded);
- the cascade prefix layout keeps width G (`CascadeRows.width`) through compaction;
- cache lengths take bucket sizes (`bucket_length`): the cascade prefix is padded to one
  (masked columns), the plain cache is allocated at one, and the RoPE table and key mask
  span one, so windows of other widths in the same bucket (the next step's documents)
  reuse the graphs; the thought slot is a 0-d tensor too (`ctx.decode_slot`).

Every graph compilation is counted (`compile_count`, the `decode_compiles` metric): at most
one per (model, bucket) plus graph-break pieces, tested bounded over 20-step rollouts.

Masked columns are exact: their scores get Megatron's -10000 fill, whose exp underflows to 0
in fp32, so the softmax equals the eager one over the live columns up to fp32 summation order.

Mamba layers (hybrid models) run the eager engine: their decode step (`models.mamba.mixer`)
reads and writes the conv/SSM states through Python-side bookkeeping on the inference
context (`sequence_len_offset`, per-layer dictionary entries replaced each step) that would
specialise a graph per step; `compile_decode` is then a no-op for the rollout (said once).

Written here because Megatron-Core's own inference CUDA graphs (`cuda_graph_impl="local"`)
serve its dynamic-batching engine and need CUDA; this runs on CPU (inductor) and CUDA.
"""

from __future__ import annotations

import functools
import warnings

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor

from megatron_rlp.packing.cascade import CascadeKV, CascadeRows, merge_parts, prefix_attention
from megatron_rlp.rollout.sampling import sample_tokens

_compiles = 0
_RECOMPILE_LIMIT = 64
_MASKED = -10000.0  # Megatron's torch-softmax fill (FusedScaleMaskSoftmax), exp() -> 0 in fp32


def compile_count() -> int:
    """Graph compilations of the compiled decode step and sampler in this process (first
    compilations, recompiles and graph-break pieces): the `decode_compiles` metric."""
    return _compiles


def _counting_inductor(graph, example_inputs):
    """torch.compile backend: inductor, counted; CUDA graphs on CUDA inputs (the
    `mode="reduce-overhead"` setting, `triton.cudagraphs`)."""
    from torch._inductor.compile_fx import compile_fx

    global _compiles
    _compiles += 1
    cuda = any(isinstance(x, Tensor) and x.is_cuda for x in example_inputs)
    return compile_fx(graph, example_inputs, config_patches={"triton.cudagraphs": cuda})


def compiled(fn):
    """`fn` under torch.compile with static shapes, counted (one graph per shape).

    Dynamo's recompile limit (8 graphs per code object) is raised to `_RECOMPILE_LIMIT`:
    one wrapper serves every (model, batch bucket, cache layout)."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(fn, backend=_counting_inductor, dynamic=False)


def bucket_rows(n: int, rows: int) -> int:
    """The decode batch for `n` rows that must stay decoded, out of the fork's `rows`:
    the smallest power of two >= n, or `rows` itself when that is not smaller.

    Raises:
        ValueError: n outside [1, rows].
    """
    if not 1 <= n <= rows:
        raise ValueError(f"need 1 <= n <= rows, got n={n}, rows={rows}")
    size = 1 << (n - 1).bit_length()
    return size if size < rows else rows


def bucket_length(n: int) -> int:
    """A static cache length for `n` columns: `n` rounded up to a multiple of
    max(64, 2^ceil(log2 n) / 4), i.e. at most four buckets per octave above 256 and at most
    a third of the columns masked padding (64 below 256).

    Raises:
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"need n >= 1, got n={n}")
    step = max(64, (1 << (n - 1).bit_length()) // 4)
    return -(-n // step) * step


def bucket_keep(unfinished: Tensor, rows: int) -> Tensor:
    """Rows to keep (sorted, so each context's rows stay contiguous) when compacting to a
    bucket: every unfinished row, then the first finished ones as filler.

    Args:
        unfinished: [L] bool over the decoded rows.
        rows: the fork's row count (the largest bucket).

    Returns:
        [bucket_rows(unfinished.sum(), rows)] long, ascending.
    """
    size = bucket_rows(int(unfinished.sum()), rows)
    order = torch.argsort((~unfinished).to(torch.uint8), stable=True)  # unfinished first
    return order[:size].sort().values


def static_decode_attention(self: SelfAttention, hidden_states: Tensor, attention_mask: Tensor,
                            key_value_states=None, inference_context=None, rotary_pos_emb=None,
                            **_unused) -> tuple[Tensor, Tensor | None]:
    """`packing.decode._decode_attention` with static shapes: the position is the 0-d tensor
    `ctx.decode_pos`, the new key is written with `index_copy_`, and scores cover the whole
    cache with later columns masked. [1, R, h] -> (out, bias)."""
    ctx = inference_context
    pos = ctx.decode_pos.view(1)
    query, key, value = self.get_query_key_value_tensors(hidden_states, None)  # [1, R, n, d]
    if rotary_pos_emb is not None:
        emb = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        freqs = emb.index_select(0, pos)
        query = apply_rotary_pos_emb(query, freqs, config=self.config)
        key = apply_rotary_pos_emb(key, freqs, config=self.config)
    scale = getattr(self.core_attention, "softmax_scale", None) or query.shape[-1] ** -0.5
    entry = ctx.key_value_memory_dict[self.layer_number]
    if isinstance(entry, CascadeKV):
        context = static_cascade_attention(query[0], key[0], value[0], entry, ctx.cascade_rows,
                                           ctx.decode_slot.view(1), scale)
        return self.linear_proj(context[None])
    cache_k, cache_v = entry  # [S, R, g, d], the engine's rows exactly
    cache_k.index_copy_(0, pos, key)
    cache_v.index_copy_(0, pos, value)
    _, rows, heads, dim = query.shape
    groups = cache_k.shape[2]
    q = query[0].view(rows, groups, heads // groups, dim)
    scores = torch.einsum("rghd,srgd->rghs", q, cache_k).float() * scale
    scores = scores.masked_fill(attention_mask.view(rows, 1, 1, -1), _MASKED)
    probs = torch.softmax(scores, -1).to(cache_v.dtype)
    context = torch.einsum("rghs,srgd->rghd", probs, cache_v).reshape(1, rows, heads * dim)
    return self.linear_proj(context)


def static_cascade_attention(query: Tensor, key: Tensor, value: Tensor, entry: CascadeKV,
                             rows: CascadeRows, slot: Tensor, scale: float) -> Tensor:
    """`packing.cascade.cascade_attention` over the whole [T] thought cache, thought slots
    after `slot` ([1] long tensor) masked; `rows.width` is G (static through compaction).

    Returns:
        [R, heads * dim] context vectors in the cache's dtype.
    """
    r, heads, dim = query.shape
    entry.k.index_copy_(0, slot, key[None])
    entry.v.index_copy_(0, slot, value[None])
    q = query.view(r, key.shape[1], heads // key.shape[1], dim)
    out_p, lse_p = prefix_attention(q, entry, rows, scale)
    scores = torch.einsum("rghd,srgd->rghs", q, entry.k).float() * scale
    future = torch.arange(entry.k.shape[0], device=slot.device) > slot
    scores = scores.masked_fill(future, _MASKED)
    lse_t = torch.logsumexp(scores, -1, keepdim=True)
    probs = torch.exp(scores - lse_t).to(entry.v.dtype)
    out_t = torch.einsum("rghs,srgd->rghd", probs, entry.v).float()
    return merge_parts(out_p, lse_p, out_t, lse_t).to(entry.v.dtype).reshape(r, heads * dim)


def _forward(module: torch.nn.Module, *args, **kwargs):
    return module(*args, **kwargs)


@functools.cache
def _compiled_forward():
    return compiled(_forward)


def _tp_group_quietly(tp_group, is_expert=False, check_initialized=True):
    """`megatron.core.utils.get_tensor_model_parallel_group_if_none` without its deprecation
    warning: Megatron's `RowParallelLinear` passes `tp_group=None` at every call, and
    `warnings.warn` with keyword arguments breaks the graph at every linear layer."""
    if tp_group is not None or not torch.distributed.is_initialized():
        return tp_group
    if not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def compiled_call(module: torch.nn.Module, *args, inference_context=None, **kwargs):
    """`module(*args, inference_context=..., **kwargs)` under the counted compile (one graph
    per module and shape). The context's `sequence_len_offset` reads 1 ("decoding") during
    the call: Megatron's `HybridStack` copies it to `seqlen_offset`, which would specialise a
    graph per step; the position the step needs is `ctx.decode_pos` (a tensor). Its
    `max_sequence_length` reads `ctx.static_length` (the bucketed length of the RoPE table,
    `SharedPrefixEngine._make_static`): Megatron's RoPE sizing reads it, which would
    specialise a graph per window width."""
    ctx = inference_context
    original = tp_layers.get_tensor_model_parallel_group_if_none
    tp_layers.get_tensor_model_parallel_group_if_none = _tp_group_quietly
    offset, ctx.sequence_len_offset = ctx.sequence_len_offset, 1
    length, ctx.max_sequence_length = ctx.max_sequence_length, ctx.static_length
    try:
        return _compiled_forward()(module, *args, inference_context=ctx, **kwargs)
    finally:
        tp_layers.get_tensor_model_parallel_group_if_none = original
        ctx.sequence_len_offset, ctx.max_sequence_length = offset, length


def static_rope(self: torch.nn.Module, *_args, **_kwargs) -> Tensor:
    """A `RotaryEmbedding.forward` (bound to the module) that returns the table the engine
    computed before the compiled call (`_rlp_static_emb`, eager): Megatron's `get_emb`
    moves `inv_freq` with `torch.cuda.current_device()` on every CPU call, which breaks the
    graph."""
    return self._rlp_static_emb


def warn_eager(reason: str) -> None:
    """One warning when `rlp.compile_decode` falls back to the eager step."""
    warnings.warn(f"rlp.compile_decode: eager decode step ({reason})", stacklevel=3)


def _sample(logits: Tensor, keys: Tensor, temperature: float, top_p: float,
            vocab_size: int) -> tuple[Tensor, Tensor]:
    """`rollout.vocab_parallel.sample_vocab_parallel` on one tensor-parallel rank."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    logits = logits.float().masked_fill(ids >= vocab_size, float("-inf"))
    return sample_tokens(logits, keys, temperature, top_p)


@functools.cache
def _compiled_sample():
    return compiled(_sample)


def _score(logits: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """`rollout.vocab_parallel.token_logprobs_vocab_parallel` on one tensor-parallel rank
    without gradient (Megatron's cross-entropy arithmetic: max, shift, exp-sum, log)."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    logits = logits.float().masked_fill(ids >= vocab_size, float("-inf"))
    shifted = logits - logits.max(-1, keepdim=True).values
    return shifted.gather(-1, targets[:, None])[:, 0] - shifted.exp().sum(-1).log()


@functools.cache
def _compiled_score():
    return compiled(_score)


def compiled_scorer(logits: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """The decode loop's S_pred log-prob under the counted compile (one graph per batch
    bucket): `token_logprobs_vocab_parallel(logits, targets, vocab_size)` with one
    tensor-parallel rank and no gradient. [R, V] fp32 logits, [R] targets -> [R] fp32."""
    return _compiled_score()(logits, targets, vocab_size)


def compiled_sampler(logits: Tensor, keys: Tensor, temperature: float, top_p: float,
                     vocab_size: int) -> tuple[Tensor, Tensor]:
    """The decode loop's sampler under the counted compile (one graph per batch bucket):
    keyed Gumbel noise over the vocabulary, top-p, log-probs, fused. Same arguments and
    results as `sample_vocab_parallel` with one tensor-parallel rank."""
    return _compiled_sample()(logits, keys, temperature, top_p, vocab_size)
