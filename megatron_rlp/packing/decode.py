"""Decode steps without per-step work over the whole KV cache.

Megatron's static-batching attention (`Attention._adjust_key_value_for_inference`, then
`apply_rotary_pos_emb` and `DotProductAttention`) caches keys before RoPE and, at every decode
step and layer, rotates *all* cached keys again and repeats K and V over the query heads of
each group (grouped-query attention). Both are elementwise work and copies over the whole
[S, R, heads, dim] cache for one new token per row: on the rollout's small decode batches
they cost more than the attention itself (profiled: ~40% of a tiny model's rollout).

`SharedPrefixEngine` keeps Megatron's prefill, then rotates the cached keys once, and for
decode steps replaces each `SelfAttention.forward` by `_decode_attention`: the new key is
rotated once when written, and scores are computed per query group against the unrepeated
cache. Same projections (Megatron's `get_query_key_value_tensors`, `linear_proj`, q/k norms),
same RoPE rows, same -10000 mask fill and fp32 softmax as `FusedScaleMaskSoftmax`'s torch
path; only the summation order of the score matmuls differs (fp32 rounding).

Written here because Megatron's fast decode paths (`flash_decode`, dynamic batching) need
flash-attn kernels; this one is plain torch and runs on CPU and GPU. Attention-only models
(Mamba layers keep the stock engine). Unfused RoPE only.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.moe.router import TopKRouter
from torch import Tensor

from megatron_rlp.models.mamba.model_walk import has_mamba
from megatron_rlp.models.provider import unwrap_model
from megatron_rlp.packing import compiled
from megatron_rlp.packing.cascade import (
    CascadeKV,
    CascadeRows,
    cascade_attention,
    cascade_fork,
    cascade_keep,
)
from megatron_rlp.parallel.pipeline import chunks_of, pipeline_size
from megatron_rlp.rollout.engine import KVCacheEngine


def _decode_attention(self: SelfAttention, hidden_states: Tensor, attention_mask: Tensor,
                      key_value_states=None, inference_context=None, rotary_pos_emb=None,
                      **_unused) -> tuple[Tensor, Tensor | None]:
    """One decode step of `self` (bound as the module's forward): [1, R, h] -> (out, bias).

    The cache at `inference_context.key_value_memory_dict[layer]` holds rotated keys."""
    ctx = inference_context
    pos = ctx.sequence_len_offset
    query, key, value = self.get_query_key_value_tensors(hidden_states, None)  # [1, R, n, d]
    if rotary_pos_emb is not None:
        emb = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        freqs = emb[pos:pos + 1]
        query = apply_rotary_pos_emb(query, freqs, config=self.config)
        key = apply_rotary_pos_emb(key, freqs, config=self.config)
    entry = ctx.key_value_memory_dict[self.layer_number]
    if isinstance(entry, CascadeKV):  # shared prefix + own thought keys (packing/cascade.py)
        scale = getattr(self.core_attention, "softmax_scale", None) or query.shape[-1] ** -0.5
        context = cascade_attention(query[0], key[0], value[0], entry, ctx.cascade_rows, pos,
                                    scale)
        return self.linear_proj(context[None])
    cache_k, cache_v = entry
    rows = key.shape[1]
    cache_k[pos, :rows] = key[0]
    cache_v[pos, :rows] = value[0]
    k, v = cache_k[:pos + 1, :rows], cache_v[:pos + 1, :rows]  # [S, R, g, d]
    _, _, heads, dim = query.shape
    groups = k.shape[2]
    q = query[0].view(rows, groups, heads // groups, dim)
    scale = getattr(self.core_attention, "softmax_scale", None) or dim ** -0.5
    scores = torch.einsum("rghd,srgd->rghs", q, k).float() * scale
    if attention_mask is not None:  # [R, 1, 1, S] True = masked
        scores = scores.masked_fill(attention_mask.view(rows, 1, 1, -1), -10000.0)
    probs = torch.softmax(scores, -1).to(v.dtype)
    context = torch.einsum("rghs,srgd->rghd", probs, v).reshape(1, rows, heads * dim)
    return self.linear_proj(context)


class SharedPrefixEngine(KVCacheEngine):
    """`KVCacheEngine` whose decode steps use `_decode_attention` (rotated-key cache).

    Call `rotate_cache()` once after the prefill (and after any rearranging of pre-RoPE
    columns, see `packing.prefill`); `prefill` does it itself.

    With `cascade` (the default) `fork` keeps each context's prefix K/V once and gives every
    branch row its own thought cache (`packing.cascade`: C x P + R x T cache entries per
    layer instead of R x (P + T)); without it the prefix is copied to every row.

    With `compile` the decode steps after the fork run `packing.compiled`'s static-shape step
    under torch.compile (batch in buckets, whole cache masked); eager for Mamba layers and
    tensor- or pipeline-parallel layouts (one warning, see `packing.compiled`)."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_sequence_length: int,
                 cascade: bool = True, compile: bool = False):
        compile = compile and _compilable(model)
        if compile and not cascade:  # the plain cache at a static length (masked beyond)
            max_sequence_length = compiled.bucket_length(max_sequence_length)
        super().__init__(model, max_batch_size, max_sequence_length)
        self.cascade = cascade
        self.compile = compile
        self._static = False  # set by the fork: decode steps from here on are compiled
        self._full = (max_batch_size, max_sequence_length)
        self.attentions = [m for c in chunks_of(model) for m in unwrap_model(c).modules()
                           if isinstance(m, SelfAttention)]
        for chunk in chunks_of(model):
            if unwrap_model(chunk).config.apply_rope_fusion:
                raise ValueError("SharedPrefixEngine needs unfused RoPE")

    def prefill(self, tokens: Tensor, valid: Tensor) -> Tensor:
        logits = super().prefill(tokens, valid)
        self.rotate_cache()
        return logits

    @torch.no_grad()
    def rotate_cache(self) -> None:
        """Apply RoPE to the cached keys [0, offset) once (Megatron caches them unrotated)."""
        upto = self.ctx.sequence_len_offset
        for chunk in chunks_of(self.model):
            rope = getattr(unwrap_model(chunk), "rotary_pos_emb", None)
            if rope is None:
                continue
            freqs = rope.get_emb(upto)
            cache = self.ctx.key_value_memory_dict
            for m in unwrap_model(chunk).modules():
                if isinstance(m, SelfAttention) and m.layer_number in cache:
                    k, _ = cache[m.layer_number]
                    k[:upto] = apply_rotary_pos_emb(k[:upto], freqs.to(k.device),
                                                    config=m.config)

    def limit_prefix(self, rows: int, columns: int) -> None:
        """Before a prefill (cascade only): Megatron's attention allocates its cache at the
        context's max batch x max sequence, so make those the prefill's own rows and prefix
        columns; `fork` restores them. Without it the prefill would hold R x (P + T)."""
        if self.cascade:
            self.ctx.max_batch_size, self.ctx.max_sequence_length = rows, columns

    def fork(self, n: int) -> None:
        self._fork(n)
        if self.compile:
            self._make_static(n)

    def _fork(self, n: int) -> None:
        if not self.cascade:
            return super().fork(n)
        self.ctx.max_batch_size, self.ctx.max_sequence_length = self._full
        valid = torch.zeros(self.key_valid.shape[0], self._full[1], dtype=torch.bool,
                            device=self.key_valid.device)
        valid[:, :self.key_valid.shape[1]] = self.key_valid
        self.ctx.cascade_rows = cascade_fork(self.ctx, n, valid)
        self.key_valid = valid[self.ctx.cascade_rows.row_context]

    def keep(self, rows: Tensor) -> None:
        if not self.cascade:
            return super().keep(rows)
        self.ctx.cascade_rows = cascade_keep(self.ctx, self.ctx.cascade_rows, rows)
        self.key_valid = self.key_valid[rows.to(self.key_valid.device)]
        if self._static:
            self.ctx.cascade_rows.width = self._group  # static prefix layout [C, G]

    def _make_static(self, n: int) -> None:
        """After the fork: zero the plain cache's columns not written yet (masked columns
        are read, and Megatron allocates the cache uninitialised); pad the cascade prefix to
        a bucket length with masked columns and fix its layout's width at G; the key mask
        and RoPE table at a static length; the decode position and thought slot in
        tensors."""
        offset = self.ctx.sequence_len_offset
        for entry in self.ctx.key_value_memory_dict.values():
            if type(entry) is tuple:  # plain K/V (not CascadeKV, not MambaState)
                for cache in entry:
                    cache[offset:] = 0
        length = self.ctx.max_sequence_length
        if self.cascade:
            self._prefix = offset  # P: the thought slot of column c is c - P
            pad = compiled.bucket_length(offset) - offset
            rows = self.ctx.cascade_rows
            if pad:
                cache = self.ctx.key_value_memory_dict
                for layer, entry in list(cache.items()):
                    if isinstance(entry, CascadeKV):
                        cache[layer] = entry._replace(
                            prefix_k=_pad_rows(entry.prefix_k, pad),
                            prefix_v=_pad_rows(entry.prefix_v, pad))
                rows = CascadeRows(rows.row_context, torch.nn.functional.pad(
                    rows.prefix_masked, (0, pad), value=True))
                self.ctx.cascade_rows = rows
                self.key_valid = torch.nn.functional.pad(self.key_valid, (0, pad))
                length += pad
            rows.width = n
            self.ctx.decode_slot = torch.zeros((), dtype=torch.long,
                                               device=self.key_valid.device)
        self.ctx.static_length = length  # what the compiled call sees (`compiled_call`)
        for chunk in chunks_of(self.model):  # eager, once (see `compiled.static_rope`)
            rope = getattr(unwrap_model(chunk), "rotary_pos_emb", None)
            if rope is not None:
                rope._rlp_static_emb = type(rope).forward(rope, length)
        self._group, self._rows = n, self.key_valid.shape[0]
        self.ctx.decode_pos = torch.zeros((), dtype=torch.long, device=self.key_valid.device)
        self._static = True

    def rows_to_keep(self, unfinished: Tensor) -> Tensor:
        if not self._static:
            return super().rows_to_keep(unfinished)
        return compiled.bucket_keep(unfinished, self._rows)

    @property
    def sampler(self):
        return compiled.compiled_sampler if self._static else None

    @property
    def scorer(self):
        return compiled.compiled_scorer if self._static else None

    def step(self, tokens: Tensor) -> Tensor:
        if not self._static:
            return super().step(tokens)
        pos = self.ctx.sequence_len_offset
        self.key_valid[:, pos] = True
        self.ctx.decode_pos.fill_(pos)
        if self.cascade:
            self.ctx.decode_slot.fill_(pos - self._prefix)
        return self._forward(tokens[:, None], ~self.key_valid[:, None, None, :])

    def _forward(self, tokens: Tensor, mask: Tensor) -> Tensor | None:
        if self.ctx.sequence_len_offset == 0:  # prefill: Megatron's own path
            return super()._forward(tokens, mask)
        patched = list(self.attentions)
        for m in self.attentions:
            m.forward = _bound(m, compiled.static_decode_attention if self._static
                               else _decode_attention)
        if self._static:  # the RoPE table of `_make_static` (see `compiled.static_rope`)
            for chunk in chunks_of(self.model):
                rope = getattr(unwrap_model(chunk), "rotary_pos_emb", None)
                if rope is not None:
                    rope.forward = _bound(rope, compiled.static_rope)
                    patched.append(rope)
        try:
            return super()._forward(tokens, mask, compiled.compiled_call if self._static
                                    else None)
        finally:
            for m in patched:
                del m.forward  # back to the class method


def _pad_rows(x: Tensor, pad: int) -> Tensor:
    """`x` [P, ...] with `pad` zero rows after."""
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])])


def _bound(module: torch.nn.Module, fn):
    """`fn` bound to `module`, made once per (module, fn): the compiled step's guards see
    the same method object at every step."""
    cache = module.__dict__.setdefault("_rlp_decode_forwards", {})
    if fn not in cache:
        cache[fn] = fn.__get__(module)
    return cache[fn]


def _compilable(model: torch.nn.Module) -> bool:
    """Whether `packing.compiled`'s step serves this model and layout (warns once if not)."""
    if has_mamba(model):
        compiled.warn_eager("Mamba layers: their decode state bookkeeping is per step")
        return False
    if any(isinstance(m, TopKRouter) for m in model.modules()):
        # the rollout records each router's choice with forward hooks (models.moe_routing),
        # and Megatron's token dispatch sizes its buffers from the routing: not fixed-shape
        compiled.warn_eager("MoE layers: routing is recorded and dispatched per step")
        return False
    if pipeline_size() > 1 or parallel_state.get_tensor_model_parallel_world_size() > 1:
        compiled.warn_eager("tensor/pipeline parallel: collectives in the graph are untested")
        return False
    return True
