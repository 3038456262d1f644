"""Answer decoding and continuation log-likelihoods for evaluation, on the rollout code.

Generation drives the rollout's `KVCacheEngine` (Megatron's `StaticInferenceContext`):
left-padded prompts are prefilled once, then one token per row and step. Sampled decoding
uses the rollout sampler (`sample_vocab_parallel`: keyed Gumbel-max over vocabulary shards,
so the same keys give the same text under any layout); greedy decoding needs the argmax over
vocabulary shards, which the rollout code does not have (it only samples), so
`argmax_vocab_parallel` is added here. Thoughts are not sampled here: `benchmark.py` calls
the rollout's own `sample_thoughts`.

Log-likelihoods are one full forward over `context + continuation` (left-padded, as the
teacher scores windows in `scoring/next_token.py`) with the same vocabulary-parallel log-prob
(`token_logprobs_vocab_parallel`, padded ids excluded). With pipeline parallel the last stage
computes and broadcasts; every stage runs the same calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_rlp.data.batches import left_pad
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.parallel.pipeline import from_last_stage, stage_forward
from megatron_rlp.parallel.sequence import sequence_parallel_off
from megatron_rlp.rollout.engine import KVCacheEngine
from megatron_rlp.rollout.thoughts import any_in_expert_group
from megatron_rlp.rollout.vocab_parallel import (
    mask_padded_vocab,
    sample_vocab_parallel,
    token_logprobs_vocab_parallel,
)


def argmax_vocab_parallel(logits: Tensor, vocab_size: int) -> Tensor:
    """Greedy token over vocabulary shards, padded ids excluded; ties go to the lowest global
    id, as `torch.argmax` over the full vocabulary does.

    Args:
        logits: [..., V/tp] this rank's shard.

    Returns:
        [...] long global ids, identical on every rank of the TP group.
    """
    logits = mask_padded_vocab(logits.float(), vocab_size)
    best, index = logits.max(dim=-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return index
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    pairs = torch.stack([best.double(), (index + start).double()])  # ids < 2**53: exact
    gathered = [torch.empty_like(pairs) for _ in range(tp)]
    dist.all_gather(gathered, pairs, group=parallel_state.get_tensor_model_parallel_group())
    winner = torch.stack([g[0] for g in gathered]).argmax(dim=0)  # first max: lowest shard
    return torch.stack([g[1] for g in gathered]).gather(0, winner[None])[0].long()


def ban_ids(logits: Tensor, banned: Sequence[int]) -> Tensor:
    """`logits` with the global ids `banned` set to -inf in this rank's vocabulary shard, so a
    softmax over the rest is renormalised over the allowed ids (the fair no-thought baseline
    bans `<think>` at the answer start).

    Args:
        logits: [..., V/tp] this rank's shard (not modified).
        banned: global token ids.

    Returns:
        [..., V/tp] fp32 logits.
    """
    logits = logits.float().clone()
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    for i in banned:
        if start <= i < start + logits.shape[-1]:
            logits[..., i - start] = float("-inf")
    return logits


def _fit(seq: Sequence[int], limit: int) -> list[int]:
    """The last `limit` tokens (prompts longer than the model's window lose their start)."""
    return list(seq)[-limit:]


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             max_sequence_length: int, vocab_size: int, pad: int,
             stop_ids: Sequence[int] = (), stop_texts: Sequence[str] = (), decode=None,
             temperature: float = 0.0, top_p: float = 1.0, keys: Tensor | None = None,
             ban_first: Sequence[int] = ()) -> list[list[int]]:
    """Continue every prompt until a stop token, a stop text or `max_new_tokens`.

    Args:
        model: the policy, unwrapped, in eval mode (this rank's stage or chunks).
        prompts: token ids, one list per row (left-truncated to fit the window).
        stop_ids: tokens that end a row (kept in its output).
        stop_texts: strings that end a row once `decode(row)` contains one (the row's
            tokens are kept; `truncate_at_stop` cuts the text).
        decode: ids -> text, needed with `stop_texts`.
        temperature: 0 = greedy; > 0 samples with `keys`.
        keys: [N, K] long sampling keys of the rows (e.g. seed, step, item, sample); the token
            index is appended, so a row's draws depend on its keys alone.
        ban_first: ids that may not be the first generated token (e.g. `<think>`).

    Returns:
        The generated ids of each row.

    Raises:
        ValueError: sampling without keys, or stop texts without `decode`.
    """
    if temperature > 0 and keys is None:
        raise ValueError("sampled decoding needs keys (temperature > 0)")
    if stop_texts and decode is None:
        raise ValueError("stop_texts need a decode function")
    n = len(prompts)
    room = max(max_sequence_length - max_new_tokens, 1)
    fitted = [_fit(p, room) for p in prompts]
    tokens, valid = left_pad(fitted, pad)
    device = next(model.parameters()).device
    tokens, valid = tokens.to(device), valid.to(device)
    engine = KVCacheEngine(model, max_batch_size=n,
                           max_sequence_length=tokens.shape[1] + max_new_tokens)
    logits = engine.prefill(tokens, valid)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    out = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    if keys is not None:
        keys = torch.cat([keys.to(device).long(), torch.zeros(n, 1, dtype=torch.long,
                                                              device=device)], 1)
    for k in range(max_new_tokens):
        tok = None
        if logits is not None:  # last pipeline stage
            if k == 0 and ban_first:
                logits = ban_ids(logits, ban_first)
            if temperature > 0:
                keys[:, -1] = k
                tok, _ = sample_vocab_parallel(logits, keys, temperature, top_p, vocab_size)
            else:
                tok = argmax_vocab_parallel(logits, vocab_size)
            tok = tok.double()
        tok = from_last_stage(tok, (n,), torch.float64).long()
        active = ~finished
        out[:, k] = torch.where(active, tok, pad)
        lengths += active.long()
        finished |= active & torch.isin(tok, stop)
        if stop_texts:
            for r in torch.nonzero(active & ~finished).flatten().tolist():
                if any(s in decode(out[r, : k + 1].tolist()) for s in stop_texts):
                    finished[r] = True
        # MoE with EP > 1: every forward is a collective of the expert-parallel group
        if k == max_new_tokens - 1 or not any_in_expert_group(not bool(finished.all())):
            break
        logits = engine.step(torch.where(finished, pad, tok))
    return [out[r, : int(lengths[r])].tolist() for r in range(n)]


def truncate_at_stop(text: str, stop_texts: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop text (lm-eval's `until`)."""
    cut = min((i for i in (text.find(s) for s in stop_texts if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], *, max_sequence_length: int,
                          vocab_size: int, pad: int, ban_first: Sequence[int] = ()
                          ) -> tuple[list[list[float]], list[bool]]:
    """log p(continuation tokens | context), one forward over the batch.

    Args:
        contexts: token ids per row (non-empty: callers prepend an end-of-document token to
            an empty context); left-truncated so context + continuation fit the window.
        continuations: non-empty token ids per row.
        ban_first: ids excluded at each continuation's first token: its log-prob is
            renormalised over the other ids, log p(x) - log(1 - p(banned)) (the fair
            no-thought baseline), and its greedy test ignores them.

    Returns:
        per-token log-probs of each continuation (fp32 values, temperature 1), and whether
        each continuation is the greedy one (every token the argmax, as lm-eval defines it).

    Raises:
        ValueError: an empty context or continuation, or a continuation longer than the window.
    """
    seqs, spans = [], []
    for ctx, cont in zip(contexts, continuations, strict=True):
        if not ctx or not cont:
            raise ValueError("contexts and continuations must be non-empty")
        if len(cont) >= max_sequence_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the window of "
                             f"{max_sequence_length}")
        seq = _fit(list(ctx) + list(cont), max_sequence_length)
        seqs.append(seq)
        spans.append(len(cont))
    tokens, valid = left_pad(seqs, pad)
    device = next(model.parameters()).device
    tokens, valid = tokens.to(device), valid.to(device)
    width = tokens.shape[1]
    # Row r's continuation token j sits at column width - spans[r] + j, predicted one before.
    rows = torch.cat([torch.full((s,), r, dtype=torch.long) for r, s in enumerate(spans)])
    cols = torch.cat([torch.arange(width - s, width) for s in spans])
    rows, cols = rows.to(device), cols.to(device)
    positions = torch.arange(width, device=device).expand_as(tokens)
    with sequence_parallel_off(model):
        logits = stage_forward(model, tokens, positions, padded_causal_mask(valid))
    packed = None
    if logits is not None:
        picked = logits[rows, cols - 1]
        if ban_first:  # the first token of each continuation: the banned ids renormalised out
            first = torch.cat([torch.arange(s) == 0 for s in spans]).to(device)
            picked = torch.where(first[:, None], ban_ids(picked, ban_first), picked.float())
        targets = tokens[rows, cols]
        lp = token_logprobs_vocab_parallel(picked, targets, vocab_size)
        greedy = argmax_vocab_parallel(picked, vocab_size) == targets
        packed = torch.stack([lp.double(), greedy.double()])
    packed = from_last_stage(packed, (2, len(rows)), torch.float64)
    lps, greedy = packed[0].float().tolist(), packed[1].bool().tolist()
    out_lp, out_greedy, i = [], [], 0
    for s in spans:
        out_lp.append(lps[i:i + s])
        out_greedy.append(all(greedy[i:i + s]))
        i += s
    return out_lp, out_greedy
