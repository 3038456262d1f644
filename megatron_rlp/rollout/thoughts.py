"""Thought rollouts: G thoughts per context, sampled together from one cached prefill.

For each context x_<t the model reads `x_<t <think>`, the cache is forked G ways and every
branch samples up to `max_thought_tokens` tokens, stopping at `</think>` (kept as part of
the thought) or force-closed with a `</think>` after the limit. Feeding `</think>` gives the
reasoned predictor's distribution for the real next token: S_pred = log p_theta(x_t | x_<t,
c) costs one extra decode step per thought, on the sampling cache.

Randomness is keyed by (seed, step, context id, thought index, token index) — see
`sampling.keyed_uniform` — so any parallel layout draws the same thoughts. With pipeline
parallel every stage runs this loop; the last stage samples and broadcasts the tokens.

Everything stays on the device of the prompts (the model's): a decode step reads nothing
back to the host. Only every `check_every` steps does the loop look at how many thoughts
are still open (to stop early or drop finished rows); decoding a finished row on is
harmless (it records nothing), and keyed sampling makes the thoughts independent of when
the check runs. Log-probs (sampling and S_pred) are fp32 from the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from torch import Tensor

from megatron_rlp.parallel.pipeline import from_last_stage
from megatron_rlp.rollout.engine import KVCacheEngine
from megatron_rlp.rollout.template import lead_ids
from megatron_rlp.rollout.vocab_parallel import sample_vocab_parallel, token_logprobs_vocab_parallel


@dataclass
class PromptBatch:
    """Left-padded prefixes `x_<t` of this rank's contexts.

    Attributes:
        tokens: [B, P] long, left-padded with `pad`.
        valid: [B, P] bool.
        lengths: [B] long, prefix lengths.
        targets: [B] long, the real next token x_t of each context.
        context_ids: [B] long, global index of each context in the step's batch (sampling key).
    """

    tokens: Tensor
    valid: Tensor
    lengths: Tensor
    targets: Tensor
    context_ids: Tensor


@dataclass
class ThoughtBatch:
    """Rows are (context b, thought g) at index b*G + g.

    Attributes:
        tokens: [R, L] long, sampled thought tokens (`</think>` included when sampled), pad after.
        mask: [R, L] bool, True on sampled tokens (the tokens that get a gradient).
        logprobs: [R, L] fp32, sampling log-probs log pi_old (temperature-scaled), 0 off-mask.
        lengths: [R] long, number of sampled tokens.
        closed: [R] bool, True where the policy emitted `</think>` itself.
        s_pred: [R] fp32, log p_theta(x_t | x_<t, <think> c </think>) at temperature 1.
    """

    tokens: Tensor
    mask: Tensor
    logprobs: Tensor
    lengths: Tensor
    closed: Tensor
    s_pred: Tensor


def any_in_expert_group(flag: bool) -> bool:
    """`flag` on any rank of this rank's expert-parallel group. With experts split over
    ranks (MoE, EP > 1) every forward is a collective of the group (Megatron's all-to-all
    token dispatch), so the decode loop's data-dependent choices (stop early, force-close)
    must be the same on its ranks, which hold different contexts."""
    if not parallel_state.model_parallel_is_initialized():
        return flag
    group = parallel_state.get_expert_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32,
                     device="cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(t.item())


def _chunk(prompts: PromptBatch, start: int, end: int) -> PromptBatch:
    """Contexts [start, end) of a prompt batch, with their own (narrower) left padding."""
    valid = prompts.valid[start:end]
    width = int(prompts.lengths[start:end].max())
    return PromptBatch(tokens=prompts.tokens[start:end, -width:], valid=valid[:, -width:],
                       lengths=prompts.lengths[start:end], targets=prompts.targets[start:end],
                       context_ids=prompts.context_ids[start:end])


def sample_thoughts_chunked(model: torch.nn.Module, prompts: PromptBatch, chunk_contexts: int,
                            max_thought_tokens: int, pad: int, shared=None,
                            **kwargs) -> ThoughtBatch:
    """`sample_thoughts` over chunks of `chunk_contexts` contexts (0 = one chunk), so the cache
    holds chunk x G rows at a time. Keyed sampling makes the result independent of the
    chunking. `shared` (`packing.prefill.SharedWindows`): prefill document windows once."""
    b = prompts.tokens.shape[0]
    size = chunk_contexts or b
    parts = [sample_thoughts(model, _chunk(prompts, i, min(i + size, b)),
                             max_thought_tokens=max_thought_tokens, pad=pad,
                             shared=None if shared is None else shared.chunk(i, min(i + size, b)),
                             **kwargs)
             for i in range(0, b, size)]
    if len(parts) == 1:
        return parts[0]
    return ThoughtBatch(*(torch.cat([getattr(p, f) for p in parts])
                          for f in ThoughtBatch.__dataclass_fields__))


@torch.no_grad()
def sample_thoughts(
    model: torch.nn.Module,
    prompts: PromptBatch,
    *,
    group_size: int,
    max_thought_tokens: int,
    temperature: float,
    top_p: float,
    think_start: int | list[int],
    think_end: int,
    pad: int,
    vocab_size: int,
    seed: int,
    step: int,
    compact_below: float = 0.5,
    check_every: int = 8,
    shared=None,
    routing=None,
) -> ThoughtBatch:
    """Sample `group_size` thoughts for every prompt and score the real next token after each.

    Args:
        model: the policy, unwrapped (one pipeline stage holding the whole model).
        prompts: this rank's contexts.
        think_start: the `<think>` id, or a template's lead (forced ids ending with `<think>`,
            `rollout.template`) fed after every prefix.
        vocab_size: the tokenizer's vocabulary; padded-vocabulary ids are never sampled and
            are left out of every log-prob (as in the update and the teacher's scores).
        compact_below: once the unfinished thoughts are at most this fraction of the rows
            being decoded, the finished ones leave the cache and the batch (0 = never).
            Keyed sampling makes the thoughts independent of it.
        check_every: decode steps between host-side looks at the open thoughts (early stop,
            compaction); the only device-to-host syncs of the decode loop.
        shared: `packing.prefill.SharedWindows` of these contexts: each document window is
            prefilled once and the contexts' caches are cut from it (Mamba layers: states at t_k);
            None prefills every prompt. The rollout only calls it (`shared.engine(model,
            max_batch_size, max_sequence_length)`, `shared.prefill(engine, lead)`, `.tokens`,
            `.chunk(start, end)`), so rollout/ does not import packing/.
        routing: `models.moe_routing.RolloutRouting` (MoE models): told after the prefill
            and each decode step, it records the experts that predicted every thought token.
    """
    b, p = prompts.tokens.shape
    g, n = group_size, max_thought_tokens
    lead = lead_ids(think_start)
    rows, device = b * g, prompts.tokens.device
    if shared is not None:
        p = shared.tokens.shape[1]
    length = p + len(lead) + n + 1
    if shared is not None:  # the caller's shared-prefix engine and prefill (packing.prefill)
        engine = shared.engine(model, max_batch_size=rows, max_sequence_length=length)
        logits = shared.prefill(engine, lead)
    else:
        engine = KVCacheEngine(model, max_batch_size=rows, max_sequence_length=length)
        start = torch.tensor(lead, dtype=torch.long, device=device).expand(b, -1)
        logits = engine.prefill(
            torch.cat([prompts.tokens, start], 1),
            torch.cat([prompts.valid, torch.ones_like(start, dtype=torch.bool)], 1))
    if routing is not None:
        routing.begin(rows, n)
        routing.prefill(b, g)
    engine.fork(g)
    if logits is not None:
        logits = logits.repeat_interleave(g, 0)

    keys = torch.stack([
        torch.full((rows,), seed, dtype=torch.long, device=device),
        torch.full((rows,), step, dtype=torch.long, device=device),
        prompts.context_ids.repeat_interleave(g),
        torch.arange(g, device=device).repeat(b),
        torch.zeros(rows, dtype=torch.long, device=device),
    ], 1)
    targets = prompts.targets.repeat_interleave(g)

    tokens = torch.full((rows, n), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, n, dtype=torch.float32, device=device)
    mask = torch.zeros(rows, n, dtype=torch.bool, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    s_pred = torch.full((rows,), float("nan"), dtype=torch.float32, device=device)

    # The engine decodes `live` rows (original row ids, in cache order); finished rows are
    # dropped from it now and then (`compact_below`), so `x[live]` is what the engine sees.
    live = torch.arange(rows, device=device)

    def score(next_logits: Tensor | None, which: Tensor) -> None:
        """S_pred of the live rows `which` (bool over live) from the logits after `</think>`.

        Scores every live row and keeps those of `which`: selecting the rows first would
        read their number back to the host at every step."""
        if next_logits is not None:  # S_pred lives on the last stage until the end
            lp = (engine.scorer or token_logprobs_vocab_parallel)(next_logits, targets[live],
                                                                  vocab_size)
            s_pred[live] = torch.where(which, lp, s_pred[live])

    def sample(next_logits: Tensor | None) -> tuple[Tensor, Tensor]:
        """Sample on the last stage; every stage gets (tokens, log-probs) to feed and record."""
        packed = None
        if next_logits is not None:
            tok, lp = (engine.sampler or sample_vocab_parallel)(
                next_logits, keys[live], temperature, top_p, vocab_size)
            packed = torch.stack([tok.double(), lp.double()])  # ids < 2**53: exact in fp64
        packed = from_last_stage(packed, (2, len(live)), torch.float64)
        return packed[0].long(), packed[1].float()

    for k in range(n):
        keys[:, 4] = k
        tok, lp = sample(logits)
        active = ~finished[live]
        tokens[live, k] = torch.where(active, tok, pad)
        logprobs[live, k] = torch.where(active, lp, 0.0)
        mask[live, k] = active
        closing = active & (tok == think_end)
        finished[live] |= closing
        logits = engine.step(tokens[live, k])
        if routing is not None and k + 1 < n:
            routing.decode(k + 1, live)
        score(logits, closing)
        if (k + 1) % check_every and k + 1 < n:
            continue
        unfinished = ~finished[live]
        if not any_in_expert_group(bool(unfinished.any())):
            break
        # same decision on every stage; never down to no rows (an expert-parallel peer may
        # still be decoding: this rank decodes its finished rows on, recording nothing)
        if 0 < int(unfinished.sum()) <= compact_below * len(live):
            keep = engine.rows_to_keep(unfinished)
            if len(keep) == len(live):  # already the smallest batch the engine takes
                continue
            engine.keep(keep)
            live = live[keep]
            logits = None if logits is None else logits[keep]

    closed = finished.clone()
    # force-close at the limit: `</think>` is given, not sampled
    if any_in_expert_group(not bool(closed.all())):
        logits = engine.step(torch.where(closed[live], pad, think_end))
        score(logits, ~closed[live])
    lengths = mask.sum(1)
    s_pred = from_last_stage(s_pred, (rows,), torch.float32)
    return ThoughtBatch(tokens=tokens, mask=mask, logprobs=logprobs, lengths=lengths,
                        closed=closed, s_pred=s_pred)
