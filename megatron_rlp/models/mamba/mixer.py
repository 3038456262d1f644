"""Megatron's `MambaMixer` / `MambaLayer` with four changes RLP needs (any device):

1. **Padding.** A recurrence has no attention mask: left-padding tokens would flow into the
   conv window and the SSM state, so a padded row would not equal the same row alone. The
   layer reads the padding off the attention mask it already receives (bool, True = masked;
   key j is padding when the last query cannot see it: true for left- and right-padded
   causal masks such as `masks.padded_causal_mask`) and the mixer, right after `in_proj`,
   zeroes the conv input (x, B, C) at padded positions and pushes dt there to -1e4, so that
   softplus(dt + dt_bias) == 0: no decay, no input, the state passes padding unchanged
   (still exactly zero before a row's first token). Valid positions then compute exactly
   what the unpadded row computes, in the training kernels and in the cached prefill. Masks
   that are not padded-causal (packed documents) are not supported by Mamba layers.
2. **Batched static decoding.** Megatron's `_decode` passes `[1, batch, d]` to
   `_ssm_decode`, which reads it as batch 1 with `batch` positions (right only for batch 1);
   here it is transposed to batch-first and back.
3. **Cache layout.** States are stored with batch on dim 1, like attention's K/V
   (`inference_state.MambaState`), and the mixer works on batch-first views; the cache is
   sized from the stored tensors, not a module counter. Forking every cache entry on dim 1
   (the rollout engine's `fork`) is therefore right for Mamba layers too, and a decode step
   on a cache of the wrong batch size fails loudly instead of restarting from zero states.
4. **Shared prefixes** (`branches`): given a tree mask registered by `attach_branch_layout`,
   the training forward reads branch-packed sequences (window, then branches that start
   from the states at their t_k); under `mamba_states_at` a cached prefill of document
   windows caches the states at each context's prefix end, one row per context.

Initialisation: under `use_cpu_initialization` (the provider's setting) every full weight
is drawn on the CPU from one seed and then split, so each TP layout starts from the same
model. Megatron's mixer instead slices `in_proj` contiguously (its [z, x, B, C, dt] blocks are
sharded one by one) and draws conv/dt/A per rank. Here `in_proj` keeps its full master
weight and takes each block's TP slice, and conv weight/bias, dt bias and A are drawn whole
(same distributions as Megatron) and sliced the same way.
"""

from __future__ import annotations

import math

import torch
from megatron.core.inference.utils import InferenceMode
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.utils import deprecate_inference_params
from torch import Tensor

from megatron_rlp.models.mamba.adapter import select_kernels
from megatron_rlp.models.mamba.branches import layout_of, packed_ssm, states_at
from megatron_rlp.models.mamba.inference_state import (
    batch_first,
    cached_batch_size,
    new_mamba_state,
)

_NO_STEP = -1.0e4  # dt before softplus on padding: softplus(-1e4 + dt_bias) == 0 exactly


def padding_from_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[B, 1, Q, K] bool mask (True = masked) -> [B, K] bool valid keys, or None when
    nothing is padded (or the mask is absent / not boolean)."""
    if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        return None
    valid = ~attention_mask[:, 0, -1, :]
    if bool(valid.all()):
        return None
    return valid


def _tp_slice(full: Tensor, sizes: list[int], rank: int, tp: int) -> Tensor:
    """Rows of this TP rank: each block of `sizes` along dim 0 split in tp parts, then joined."""
    return torch.cat([blk.chunk(tp, dim=0)[rank] for blk in full.split(sizes, dim=0)], dim=0)


class LocalMambaMixer(MambaMixer):
    """`MambaMixer` + padding mask, batch-first static decode, TP-invariant init, and the
    packed-branch / state-at-positions modes of `branches` (the layer passes the packed
    layout; `model_walk.mamba_states_at` sets `fork_at`)."""

    fork_at = None  # (rows, ends): a prefill caches the states at these window positions

    def __init__(self, config, submodules, d_model, *, d_conv: int = 4, conv_init=None,
                 A_init_range=(1, 16), dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, **kwargs):
        select_kernels()  # once per process: mamba-ssm on CUDA, else torch (see adapter)
        super().__init__(config, submodules, d_model, d_conv=d_conv, conv_init=conv_init,
                         A_init_range=A_init_range, dt_min=dt_min, dt_max=dt_max,
                         dt_init_floor=dt_init_floor, **kwargs)
        master = getattr(self.in_proj, "master_weight", None)
        if master is not None:
            del self.in_proj.master_weight
        if config.use_cpu_initialization and config.perform_initialization:
            self._init_tp_invariant(master, conv_init, A_init_range, dt_min, dt_max,
                                    dt_init_floor)

    @torch.no_grad()
    def _init_tp_invariant(self, master, conv_init, A_init_range, dt_min, dt_max, floor):
        tp, rank = self.pg_collection.tp.size(), self.pg_collection.tp.rank()
        ds, ng, nh = self.d_state, self.ngroups, self.nheads
        cpu = torch.device("cpu")  # explicit: stays real under a meta-device context
        if master is not None and not self.in_proj.weight.is_meta and not master.is_meta:
            w = _tp_slice(master, [self.d_inner, self.d_inner, ng * ds, ng * ds, nh], rank, tp)
            self.in_proj.weight.copy_(w)
        conv_sizes = [self.d_inner, ng * ds, ng * ds]
        conv_dim = sum(conv_sizes)
        weight = torch.empty(conv_dim, 1, self.d_conv, device=cpu)
        bound = 1 / math.sqrt(self.d_conv)  # kaiming_uniform(a=sqrt(5)) bound, fan_in = d_conv
        if conv_init is not None:
            weight.uniform_(-conv_init, conv_init)
        else:
            weight.uniform_(-bound, bound)
        bias = torch.empty(conv_dim, device=cpu).uniform_(-bound, bound)
        dt = torch.exp(torch.rand(nh, device=cpu) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        A = torch.empty(nh, device=cpu).uniform_(*A_init_range)
        for param, full, sizes in (
            (self.conv1d_weight, weight, conv_sizes), (self.conv1d_bias, bias, conv_sizes),
            (self.dt_bias, inv_dt, [nh]), (self.A_log, torch.log(A), [nh]),
        ):
            if not param.is_meta:
                param.copy_(_tp_slice(full, sizes, rank, tp).to(param.dtype))
        self._A_neg_exp_cache_stale = True

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None, token_valid: Tensor | None = None,
                branch_layout=None):
        """hidden_states [S, B, D] -> (out [S, B, D], bias); token_valid: [B, K] bool with
        K >= S; its last S columns mark this chunk's real (non-padding) tokens;
        branch_layout: `branches.BranchLayout` when the input is branch-packed sequences."""
        inference_context = deprecate_inference_params(inference_context, inference_params)
        in_inference_mode = InferenceMode.is_active()
        batch = hidden_states.shape[1]
        conv_state = ssm_state = None
        if in_inference_mode and inference_context is not None:
            if inference_context.is_dynamic_batching():
                return self._dynamic_inference(hidden_states, inference_context)
            assert not self.config.sequence_parallel
            conv_state, ssm_state = self._get_states_from_cache(inference_context, batch)
            if inference_context.sequence_len_offset > 0:
                return self._decode(hidden_states, conv_state, ssm_state)

        zxBCdt, _ = self.in_proj(hidden_states)
        if branch_layout is not None and not in_inference_mode:
            # The tree mask's padding is not a row's padding; the layout says what is what.
            return self.out_proj(packed_ssm(self, zxBCdt, branch_layout))
        if token_valid is not None:
            zxBCdt = self._mask_padding(zxBCdt, token_valid)
        zxBCdt = self.cp.pre_conv_ssm(zxBCdt, packed_seq_params)
        if in_inference_mode or not self.use_mem_eff_path:
            assert packed_seq_params is None, "packed sequences need use_mem_eff_path"
            y = self._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state)
            if self.fork_at is not None and conv_state is not None:
                entry = inference_context.key_value_memory_dict[self.layer_number]
                inference_context.key_value_memory_dict[self.layer_number] = states_at(
                    self, zxBCdt, *self.fork_at, like=entry)
        else:
            y = self._ssm_training(zxBCdt, packed_seq_params)
        return self.out_proj(y)

    def _mask_padding(self, zxBCdt: Tensor, token_valid: Tensor) -> Tensor:
        """Zero x, B, C and stop dt on padded positions. zxBCdt: [S, B, d_local]."""
        pad = ~token_valid[:, -zxBCdt.shape[0]:].transpose(0, 1)[..., None]  # [S, B, 1]
        d_xbc = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state
        z, xBC, dt = torch.split(zxBCdt, [self.d_inner_local_tp, d_xbc, self.nheads_local_tp],
                                 dim=-1)
        return torch.cat([z, xBC.masked_fill(pad, 0.0), dt.masked_fill(pad, _NO_STEP)], dim=-1)

    def _decode(self, hidden_states, conv_state, ssm_state, batch_indices=None):
        if batch_indices is not None:  # dynamic batching: Megatron already goes batch-first
            return super()._decode(hidden_states, conv_state, ssm_state, batch_indices)
        assert hidden_states.shape[0] == 1, "static decoding takes one token per row"
        zxBCdt, _ = self.in_proj(hidden_states)  # [1, B, d]
        y = self._ssm_decode(zxBCdt.transpose(0, 1), conv_state=conv_state,
                             ssm_state=ssm_state)  # [B, 1, d_inner]
        return self.out_proj(y.transpose(0, 1).contiguous())

    def _get_states_from_cache(self, inference_context, batch_size, *, inference_params=None):
        """Batch-first views of this layer's cached states (see `inference_state`).

        A prefill (sequence offset 0) allocates (or zeroes) states for `batch_size` rows; a
        decode step requires the cache to hold exactly `batch_size` rows (Megatron would
        silently restart from zero states instead).
        """
        ctx = deprecate_inference_params(inference_context, inference_params)
        assert ctx is not None and ctx.is_static_batching() and self.layer_number is not None
        entry = ctx.key_value_memory_dict.get(self.layer_number)
        if ctx.sequence_len_offset > 0:
            if entry is None or cached_batch_size(entry) != batch_size:
                have = None if entry is None else cached_batch_size(entry)
                raise RuntimeError(
                    f"Mamba layer {self.layer_number}: decoding {batch_size} rows from a cache "
                    f"of {have} rows (fork caches with fork_cached_states, batch on dim 1)")
        elif entry is None or cached_batch_size(entry) != batch_size:
            conv_shape, ssm_shape = self.mamba_state_shapes_per_request()
            # fp32 whatever the weights: the SSM state accumulates over thousands of decode
            # steps (bf16 would drift from the update's full forward); Megatron's decode and
            # the torch kernels cast to the state's dtype and back.
            entry = new_mamba_state(batch_size, conv_shape, ssm_shape,
                                    conv_dtype=torch.float32, ssm_dtype=torch.float32,
                                    device=self.conv1d_weight.device)
            ctx.key_value_memory_dict[self.layer_number] = entry
        else:  # a new prefill into an existing cache
            entry[0].zero_()
            entry[1].zero_()
        self.cached_batch_size = batch_size
        return batch_first(entry)


class LocalMambaLayer(MambaLayer):
    """`MambaLayer` that hands the attention mask's padding to its mixer (see module doc)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                inference_context=None, rotary_pos_emb=None, *, inference_params=None,
                packed_seq_params=None):
        inference_context = deprecate_inference_params(inference_context, inference_params)
        residual = hidden_states
        if self.config.fp32_residual_connection:
            residual = residual.float()
        hidden_states = self.norm(hidden_states.to(dtype=self.config.params_dtype))
        # A decode step reads no padding (its state already holds it); skipping the mask
        # check there spares a device-to-host sync per layer and token.
        decoding = (inference_context is not None
                    and getattr(inference_context, "sequence_len_offset", 0) > 0)
        layout = None if decoding else layout_of(attention_mask)  # packed update: `branches`
        out = self.mixer(hidden_states, inference_context=inference_context,
                         packed_seq_params=packed_seq_params,
                         token_valid=None if decoding or layout is not None
                         else padding_from_mask(attention_mask), branch_layout=layout)
        with self.bias_dropout_add_exec_handler():
            return self.mamba_bda(training=self.training, fused=self.config.bias_dropout_fusion)(
                out, residual, self.hidden_dropout)
