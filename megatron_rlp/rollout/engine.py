"""A small KV-cache decoding engine over a Megatron model (nanochat's `engine.py`, for Megatron).

It drives Megatron's own `StaticInferenceContext` (the KV cache Megatron's attention layers
already fill and read) and adds the two things RLP rollouts need and Megatron's text
generation controllers do not offer: left-padded prompts of different lengths in one
batch, and forking every prompt's cache into G thought branches after one prefill.

Left padding is exact for RoPE and NoPE models: attention scores depend only on relative
positions, and pad keys are masked, so a row sees what it would see alone.

Why not `DynamicInferenceContext`: on this stack it needs flash-attn varlen kernels and
Triton (no CPU path); the static context runs the same attention code on CPU and GPU.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from torch import Tensor

from megatron_rlp.models.mamba.inference_state import fork_cached_states
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.parallel.pipeline import stage_forward
from megatron_rlp.parallel.sequence import sequence_parallel_off


@contextmanager
def _vocab_shards(model: torch.nn.Module):
    """Keep the output layer's logits vocabulary-parallel.

    `HybridModel.forward` asserts `runtime_gather_output=True` in inference mode; the rollout
    sampler works on shards (`vocab_parallel.sample_vocab_parallel`), so the output layer is
    told not to gather, sparing an all-gather of [R, V] logits per decode step.
    """
    layer = getattr(model, "output_layer", None)  # absent before the last pipeline stage
    if layer is None:
        yield
        return
    # one partial per layer, reused: a compiled decode step's guards see the same object
    no_gather = layer.__dict__.get("_rlp_no_gather")
    if no_gather is None:
        no_gather = layer._rlp_no_gather = functools.partial(_no_gather, layer.forward)
    layer.forward = no_gather
    try:
        yield
    finally:
        del layer.forward  # back to the class method


def _no_gather(forward, input_, weight=None, runtime_gather_output=None):
    return forward(input_, weight=weight, runtime_gather_output=False)


class KVCacheEngine:
    """Prefill a left-padded batch once, fork each row G ways, then decode one token a step.

    With pipeline parallel every stage holds its own layers' cache and runs the same calls;
    logits come back on the last stage only (None elsewhere).

    Args:
        model: an unwrapped Megatron language model (`HybridModel`), this rank's stage.
        max_batch_size: rows after forking (contexts x thoughts).
        max_sequence_length: prompt + generated tokens.
    """

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_sequence_length: int):
        self.model = model
        self.ctx = StaticInferenceContext(max_batch_size, max_sequence_length)
        self.key_valid: Tensor | None = None  # [R, max_seq] bool: keys a row may attend to

    sampler = None  # the decode loop's sampler; None = `vocab_parallel.sample_vocab_parallel`
    scorer = None  # its S_pred log-prob; None = `vocab_parallel.token_logprobs_vocab_parallel`

    @torch.no_grad()
    def _forward(self, tokens: Tensor, mask: Tensor, call=None) -> Tensor | None:
        """`stage_forward` of `tokens` [R, S] after the cached columns; `call(model, ...)`
        replaces the model call (one stage only), e.g. a compiled one."""
        positions = torch.arange(
            self.ctx.sequence_len_offset, self.ctx.sequence_len_offset + tokens.shape[1],
            device=tokens.device,
        ).expand_as(tokens)
        with InferenceMode.active(), sequence_parallel_off(self.model), _vocab_shards(self.model):
            logits = (call or stage_forward)(self.model, tokens, positions, mask,
                                             inference_context=self.ctx,
                                             runtime_gather_output=True)
        self.ctx.increment_sequence_len_offset(tokens.shape[1])
        return None if logits is None else logits[:, -1, :].float()

    def prefill(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """Encode left-padded prompts.

        Args:
            tokens: [B, P] token ids, left-padded.
            valid: [B, P] bool, False on padding.

        Returns:
            [B, V/tp] fp32 logits (this rank's vocabulary shard) of the next token after each
            prompt; last pipeline stage only, else None.
        """
        self.ctx.reset()
        self.ctx.key_value_memory_dict.clear()
        b, p = tokens.shape
        self.key_valid = torch.zeros(b, self.ctx.max_sequence_length, dtype=torch.bool,
                                     device=tokens.device)
        self.key_valid[:, :p] = valid
        return self._forward(tokens, padded_causal_mask(valid))

    def fork(self, n: int) -> None:
        """Repeat every row's cache (attention K/V, Mamba conv/SSM state) n times: row b
        becomes rows b*n .. b*n+n-1."""
        b = self.key_valid.shape[0]
        index = torch.arange(b, device=self.key_valid.device).repeat_interleave(n)
        fork_cached_states(self.ctx, index)
        self.key_valid = self.key_valid[index]

    def keep(self, rows: Tensor) -> None:
        """Drop every cached row but `rows` (in this order): decoding finished thoughts is
        wasted work, and a decode step's cost grows with the rows it carries."""
        fork_cached_states(self.ctx, rows)
        self.key_valid = self.key_valid[rows.to(self.key_valid.device)]

    def rows_to_keep(self, unfinished: Tensor) -> Tensor:
        """The rows a compaction keeps, given `unfinished` [L] bool over the decoded rows:
        exactly the unfinished ones (a static-shape engine pads them to a bucket)."""
        return unfinished.nonzero().flatten()

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row.

        Args:
            tokens: [R] token ids.

        Returns:
            [R, V/tp] fp32 next-token logits, vocabulary shard (last pipeline stage, else None).
        """
        pos = self.ctx.sequence_len_offset
        self.key_valid[:, pos] = True
        mask = ~self.key_valid[:, None, None, : pos + 1]
        return self._forward(tokens[:, None], mask)
