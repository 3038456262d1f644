"""One RLP step (RLP.md, "One training step"), readable top to bottom:

    contexts -> rollout (G thoughts each, S_pred) -> teacher S_ema -> reward, advantages
    -> clipped-surrogate update -> EMA teacher update

Contexts are drawn globally from (seed, step) and split over data-parallel ranks; a
context's G thoughts stay on its rank, so group advantages need no communication. The
metrics are global-batch values on every rank.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from torch import Tensor

from megatron_rlp.data import ContextSampler
from megatron_rlp.data.batches import DocumentWindows, build_rlp_inputs
from megatron_rlp.models.fp8 import rollout_precision, token_multiple
from megatron_rlp.models.moe_routing import RolloutRouting, with_routing_metrics
from megatron_rlp.models.output_positions import logits_at_positions
from megatron_rlp.objective import group_advantages, info_gain_reward, rlp_policy_loss
from megatron_rlp.objective.kl import kl_penalty
from megatron_rlp.packing.flex import resolve as resolve_packed_attention
from megatron_rlp.packing.prefill import SharedWindows
from megatron_rlp.packing.update import packable, packed_forward_step, packed_update_batches
from megatron_rlp.rollout.template import apply_template, build_template, lead_ids
from megatron_rlp.rollout.thoughts import PromptBatch, ThoughtBatch, sample_thoughts_chunked
from megatron_rlp.scoring.next_token import score_next_tokens, token_logprobs_vocab_parallel
from megatron_rlp.scoring.reference import reference_logprobs
from megatron_rlp.train.builder import TrainState
from megatron_rlp.train.moe_losses import router_losses
from megatron_rlp.train.ntp_mix import ntp_pass
from megatron_rlp.train.record import record_step
from megatron_rlp.train.reduce import (
    gather_data_parallel,
    max_data_parallel,
    mean_data_parallel,
    share_last_stage_values,
)
from megatron_rlp.train.timers import PhaseTimer
from megatron_rlp.train.update import optimizer_update, split_microbatches


def local_contexts(state: TrainState, sampler: ContextSampler, step: int):
    """This data-parallel rank's slice of the step's global contexts, with their global ids."""
    r = state.cfg.rlp
    contexts = sampler.sample(step, r.contexts_per_step, r.positions_per_document)
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    per_rank = len(contexts) // dp
    ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    return [contexts[i] for i in ids], ids


def update_batch(prompts: PromptBatch, thoughts: ThoughtBatch, advantages: Tensor,
                 group_size: int, pad: int, think_start: int | list[int], multiple: int = 1
                 ) -> dict[str, Tensor]:
    """Right-padded `prefix <think> thought` sequences for the gradient forward; the width is
    a multiple of `multiple` (the TP size under sequence parallel). `think_start` may be a
    template's lead (`rollout.template`: forced ids ending with `<think>`, no loss on them).

    Returns a dict of (on the device of `advantages`; laid out on the host, one copy each):
        tokens, positions: [R, S]; index: [R, L] positions whose logits predict thought token
        k; labels, mask, logp_old: [R, L]; advantages: [R].
    """
    device = advantages.device
    prompts = PromptBatch(**{k: v.cpu() for k, v in vars(prompts).items()})
    thoughts = ThoughtBatch(**{k: v.cpu() for k, v in vars(thoughts).items()})
    lead = torch.tensor(lead_ids(think_start), dtype=torch.long)
    m = len(lead)
    lengths = prompts.lengths.repeat_interleave(group_size)  # [R]
    rows, n = thoughts.tokens.shape
    width = int((lengths + m + thoughts.lengths).max())
    width = -(-width // multiple) * multiple
    tokens = torch.full((rows, width), pad, dtype=torch.long)
    prefixes = prompts.tokens.repeat_interleave(group_size, 0)
    for r in range(rows):
        p = int(lengths[r])
        tokens[r, :p] = prefixes[r, -p:]
        tokens[r, p:p + m] = lead
        tokens[r, p + m:p + m + int(thoughts.lengths[r])] = thoughts.tokens[r, :thoughts.lengths[r]]
    k = torch.arange(n)[None]
    index = torch.where(thoughts.mask, lengths[:, None] + (m - 1) + k, 0)
    batch = dict(tokens=tokens, positions=torch.arange(width).expand(rows, -1), index=index,
                 labels=torch.where(thoughts.mask, thoughts.tokens, 0), mask=thoughts.mask,
                 logp_old=thoughts.logprobs)
    return {**{k: v.to(device) for k, v in batch.items()}, "advantages": advantages}


def trimmed_microbatches(batch: dict[str, Tensor], micro_batch_size: int, multiple: int = 1
                         ) -> list[dict[str, Tensor]]:
    """Micro-batches of sequences of similar length, each cut to its own longest sequence.

    The update batch is padded to the longest sequence of the step; with small micro-batches
    (the paper's recipes use one sequence) most of that padding is wasted compute. Without
    pipeline parallelism nothing needs equal micro-batch shapes, so rows are sorted by length
    and each micro-batch keeps the columns its logits need (right padding never changes a
    causal forward). Rows keep their tensors together, so the loss is unchanged: it is a mean
    over thoughts.
    """
    need = batch["index"].max(1).values + 1  # [R] inputs up to the last scored position
    if 0 < micro_batch_size < len(need):  # one micro-batch: keep the rows' order
        batch = {k: v[torch.argsort(need, stable=True)] for k, v in batch.items()}
    mbs = split_microbatches(batch, micro_batch_size)
    for mb in mbs:
        width = int(mb["index"].max()) + 1
        width = -(-width // multiple) * multiple
        mb["tokens"], mb["positions"] = mb["tokens"][:, :width], mb["positions"][:, :width]
    return mbs


# Per-micro-batch metrics of `_loss`; `logp_diff_max` is reduced by max, the others by mean.
LOSS_METRICS = ("loss", "clip_fraction", "is_weight_mean", "logp_diff_mean", "logp_diff_max",
                "token_mult_prob_error")


# The MoE update's own metrics (models.moe_routing.with_routing_metrics), means over
# micro-batches and data-parallel ranks.
MOE_METRICS = ("routing_agreement", "moe_expert_load_max", "moe_dropped_fraction")


def _loss(batch: dict[str, Tensor], scale: float, vocab_size: int, temperature: float,
          eps: tuple[float, float], logits: Tensor, *, logp_old_source: str = "update",
          tis_cap: float = 2.0, kl_coef: float = 0.0):
    """Clipped surrogate on this micro-batch; `scale` makes the micro-batch sum a local mean.

    `logits`: [B, L, V/tp], at the positions `batch["index"]` (see `_forward_step`).
    `batch["logp_old"]` holds the rollout's log-probs; what divides the ratio is chosen by
    `logp_old_source` (objective/policy_loss.py). Log-probs are fp32 from the logits.
    With `kl_coef` > 0, `batch["logp_ref"]` (the frozen reference's log-probs) adds
    kl_coef x the k3 KL penalty (objective/kl.py; metric `kl_ref`).
    """
    logp_new = token_logprobs_vocab_parallel(logits, batch["labels"], vocab_size, temperature)
    loss, metrics = rlp_policy_loss(logp_new, batch["logp_old"], batch["advantages"],
                                    batch["mask"], *eps, logp_old_source, tis_cap)
    if kl_coef:
        kl = kl_penalty(logp_new, batch["logp_ref"], batch["mask"])
        loss, metrics = loss + kl_coef * kl, {**metrics, "kl_ref": kl.detach()}
    return loss * scale, {"loss": loss.detach(), **metrics}


def _forward_step(scale: float, vocab_size: int, temperature: float, eps: tuple[float, float],
                  data_iterator, model, **loss_options):
    batch = next(data_iterator)
    with logits_at_positions(model, batch["index"]):  # the thought-predicting positions only
        logits = model(batch["tokens"], batch["positions"], None,
                       padding_mask=batch.get("padding_mask"))  # MoE: models.moe_routing
    return logits, partial(_loss, batch, scale, vocab_size, temperature, eps, **loss_options)


@dataclass
class ScoredRollout:
    """One step's contexts on this rank, their thoughts and their RLP signal (RLP.md, steps
    1-4). Rows are context-major: row c*G + g is thought g of context c."""

    contexts: list
    ids: list[int]            # global context ids
    prompts: PromptBatch      # the policy's prompts (`rlp.thought_template` applied)
    windows: DocumentWindows  # the policy's shared windows (shared prefill, packed update)
    thoughts: ThoughtBatch
    s_ema: Tensor             # [C] log pbar_phi(x_t | x_<t)
    rewards: Tensor           # [C*G] S_pred - S_ema
    advantages: Tensor        # [C*G] group advantages
    # The raw document windows the teacher read (== `windows` with the `none` template) and
    # the lead fed before each thought (`rollout.template`: `<think>`, or `after <think>`).
    raw_windows: DocumentWindows | None = None
    lead: tuple[int, ...] = ()
    # MoE models: [C*G, L, layers, experts] bool, the experts that predicted each thought
    # token in the rollout (`models.moe_routing`; None without E layers, or under PP / SP).
    routing: Tensor | None = None


def rollout_and_score(state: TrainState, sampler: ContextSampler, step: int,
                      timer: PhaseTimer | None = None) -> ScoredRollout:
    """The phases of step `step` before the update: draw this rank's contexts, sample G thoughts
    each (S_pred), score S_ema with the EMA teacher, rewards and group advantages. Shared by
    `rlp_step` and the `megatron.training.pretrain()` plugin (megatron_rlp/plugin.py)."""
    cfg, tok, r = state.cfg, state.tokenizer, state.cfg.rlp
    timer = timer or (lambda phase: contextlib.nullcontext())
    template = build_template(r.thought_template, tok)
    # Under FP8 training, rollouts and scoring run in bf16 unless precision.fp8_rollouts.
    with timer("rollout"), rollout_precision(cfg.precision, state.policy, state.teacher.model):
        contexts, ids = local_contexts(state, sampler, step)
        raw_prompts, raw_windows = build_rlp_inputs(contexts, ids, state.corpus,
                                                    r.max_prefix_tokens, tok.pad, state.device)
        # The policy reads the template around x_<t; the teacher keeps the raw windows.
        prompts, windows = apply_template(template, raw_prompts, raw_windows, tok.pad)
        state.policy.eval()
        routing = (RolloutRouting(state.policy) if records_routing(cfg)
                   else contextlib.nullcontext())
        with routing:
            thoughts = sample_thoughts_chunked(
                state.policy, prompts, r.rollout_chunk_contexts, group_size=r.group_size,
                max_thought_tokens=r.max_thought_tokens, temperature=r.temperature,
                top_p=r.top_p, think_start=list(template.lead), think_end=tok.think_end,
                pad=tok.pad, vocab_size=tok.vocab_size, seed=cfg.train.seed, step=step,
                shared=(SharedWindows.from_windows(windows, prompts)
                        if r.share_prefixes else None),
                routing=routing if isinstance(routing, RolloutRouting) else None)
        state.policy.train()
    with timer("scoring"), rollout_precision(cfg.precision, state.teacher.model):
        if not state.teacher.initialized:
            state.teacher.initialize_from(state.policy)  # lazy phi <- theta
        reference = getattr(state, "reference", None)
        if reference is not None and not reference.initialized:
            reference.initialize_from(state.policy)  # pi_ref: the policy of the first RLP step
        w = raw_windows  # S_ema conditions on the raw prefix x_<t (RLP.md), template or not
        s_ema = score_next_tokens(state.teacher.model, w.tokens, w.valid, w.rows, w.cols,
                                  w.targets, tok.vocab_size)
        rewards = info_gain_reward(thoughts.s_pred, s_ema.repeat_interleave(r.group_size))
        advantages = group_advantages(rewards.view(-1, r.group_size)).view(-1)
    return ScoredRollout(contexts, ids, prompts, windows, thoughts, s_ema, rewards, advantages,
                         raw_windows=raw_windows, lead=template.lead,
                         routing=(routing.result() if isinstance(routing, RolloutRouting)
                                  else None))


def records_routing(cfg) -> bool:
    """Whether the rollout records routing for `routing_agreement`: MoE layers, one pipeline
    stage (the loss, which compares, sees every router) and no sequence parallel (the
    update's routers would see a slice of each sequence)."""
    p = cfg.parallel
    return ("E" in cfg.model.hybrid_layer_pattern and p.pipeline_model_parallel_size == 1
            and not p.sequence_parallel)


def packed_microbatches(cfg, tok, ro: ScoredRollout, multiple: int, equal_width: bool
                        ) -> tuple[list[dict[str, Tensor]], str] | None:
    """The branch-packed update's micro-batches of a scored rollout (`packing.update`) and the
    core attention they run with (`model.packed_attention` resolved), or None when the packed
    update does not apply (`rlp.share_prefixes` off, or a micro-batch size that neither
    divides nor is a multiple of a document's rows). Shared by `rlp_step` and the
    `megatron.training` plugin."""
    r = cfg.rlp
    if not (r.share_prefixes and packable(cfg.model.hybrid_layer_pattern,
                                          r.positions_per_document * r.group_size,
                                          len(ro.thoughts.tokens), cfg.train.micro_batch_size)):
        return None
    attention = resolve_packed_attention(cfg.model.packed_attention, cfg.device.type,
                                         cfg.model.hybrid_layer_pattern)
    mbs = packed_update_batches(ro.windows, ro.prompts, ro.thoughts, ro.advantages,
                                r.group_size, cfg.train.micro_batch_size, tok.pad, list(ro.lead),
                                equal_width=equal_width, multiple=multiple,
                                model_cfg=cfg.model, block_sparse=attention == "flex",
                                routing=ro.routing)
    return mbs, attention


def rlp_step(state: TrainState, sampler: ContextSampler, timer: PhaseTimer,
             trace: dict | None = None) -> dict[str, float]:
    """Run RLP step `state.step + 1`; return its global metrics. A `trace` dict receives this
    rank's prompts, windows, thoughts, rewards and advantages (train/record.py;
    tools/bench_rlp.py compares them across paths)."""
    cfg, tok = state.cfg, state.tokenizer
    r, step = cfg.rlp, state.step + 1
    ro = rollout_and_score(state, sampler, step, timer)
    prompts = ro.prompts
    thoughts, s_ema, rewards, advantages = ro.thoughts, ro.s_ema, ro.rewards, ro.advantages
    with timer("update"):
        sp = cfg.parallel.sequence_parallel
        multiple = cfg.parallel.tensor_model_parallel_size if sp else 1
        multiple = math.lcm(multiple, token_multiple(cfg.precision))  # FP8 GEMM alignment
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        packed = packed_microbatches(cfg, tok, ro, multiple, equal_width=pp > 1)
        if packed is not None:
            mbs, attention = packed
            step_fn = partial(packed_forward_step, attention=attention)
            rows = len(thoughts.tokens)
            mb_rows = mbs[0]["advantages"].numel()
        else:
            batch = update_batch(prompts, thoughts, advantages, r.group_size, tok.pad,
                                 list(ro.lead), multiple)
            if ro.routing is not None:
                batch["rollout_routing"] = ro.routing.to(batch["index"].device)
            if pp == 1:
                mbs = trimmed_microbatches(batch, cfg.train.micro_batch_size, multiple)
            else:  # the pipeline schedule sends one activation shape for all micro-batches
                mbs = split_microbatches(batch, cfg.train.micro_batch_size)
            step_fn, rows, mb_rows = _forward_step, len(batch["tokens"]), len(mbs[0]["tokens"])
        options = dict(logp_old_source=r.logp_old_source, tis_cap=r.tis_cap)
        if r.kl_coef > 0:  # the frozen reference's log-probs of the same thought tokens
            options["kl_coef"] = r.kl_coef
            for mb in mbs:
                mb["logp_ref"] = reference_logprobs(state.reference.model, mb, tok.vocab_size,
                                                    r.temperature)
        forward = partial(step_fn, mb_rows * len(mbs) / rows,
                          tok.vocab_size, r.temperature, (r.clip_eps_low, r.clip_eps_high),
                          **options)
        moe = "E" in cfg.model.hybrid_layer_pattern
        if moe:  # expert load, dropped tokens, routing agreement (models/moe_routing.py)
            forward = with_routing_metrics(forward, cfg.model.moe_router_topk)
        ntp_losses, extra = [], []
        if r.ntp_loss_coef > 0:  # NTP on the raw windows, gradients added (train/ntp_mix.py)
            extra.append(ntp_pass(ro.raw_windows, r.ntp_loss_coef, multiple, ntp_losses))
        losses, grad_norm, applied = optimizer_update(state, mbs, forward,
                                                      mbs[0]["tokens"].shape[1],
                                                      extra_passes=extra)
        if applied:  # a skipped (non-finite) update leaves policy and teacher as they were
            state.teacher.update(state.policy)
        state.step = step  # the step's batch is consumed either way (keyed by the step)
    # The one step hook (train/record.py): fills `trace`, and writes MEGATRON_RLP_RECORD files.
    record_step(step, ro, trace)
    local = {k: float(torch.stack([d[k] for d in losses]).mean()) if losses else 0.0
             for k in LOSS_METRICS}
    if losses:
        local["logp_diff_max"] = float(torch.stack([d["logp_diff_max"] for d in losses]).max())
    optional = {}  # the knobs' metrics, only when they are on
    if r.kl_coef > 0 and losses:
        optional["kl_ref"] = float(torch.stack([d["kl_ref"] for d in losses]).mean())
    if r.ntp_loss_coef > 0 and ntp_losses:
        optional["ntp_loss"] = float(torch.stack(ntp_losses).mean())
    moe_names = tuple(k for k in MOE_METRICS if moe and (k != "routing_agreement"
                                                         or records_routing(cfg)))
    for k in moe_names:
        if losses:
            optional[k] = float(torch.stack([d[k] for d in losses]).mean())
    names = tuple(k for k, on in (("kl_ref", r.kl_coef > 0), ("ntp_loss", r.ntp_loss_coef > 0))
                  if on) + moe_names
    local = share_last_stage_values({**local, **optional}, LOSS_METRICS + names)
    g_rewards = gather_data_parallel(rewards)
    g_adv = gather_data_parallel(advantages)
    g_len = gather_data_parallel(thoughts.lengths.float())
    seq_lengths = prompts.lengths.repeat_interleave(r.group_size) + len(ro.lead) + thoughts.lengths
    tokens = gather_data_parallel(seq_lengths.float()).sum()
    state.consumed_tokens += int(tokens)
    return {
        "loss": mean_data_parallel(local["loss"]),
        "reward_mean": float(g_rewards.mean()),
        "reward_std": float(g_rewards.std()),
        "advantage_std": float(g_adv.std()),
        "clip_fraction": mean_data_parallel(local["clip_fraction"]),
        # Rollout (KV-cache decode) vs update (full forward) log-probs of the thought tokens.
        "logp_diff_mean": mean_data_parallel(local["logp_diff_mean"]),
        "logp_diff_max": max_data_parallel(local["logp_diff_max"]),
        "token_mult_prob_error": mean_data_parallel(local["token_mult_prob_error"]),
        "is_weight_mean": mean_data_parallel(local["is_weight_mean"]),
        "thought_len": float(g_len.mean()),
        "closed_fraction": float(gather_data_parallel(thoughts.closed.float()).mean()),
        "s_ema": float(gather_data_parallel(s_ema).mean()),
        "s_pred": float(gather_data_parallel(thoughts.s_pred).mean()),
        "grad_norm": grad_norm,
        "tokens": float(tokens),
        "skipped": float(not applied),
        **{k: mean_data_parallel(local[k]) for k in names},
        **(router_losses(cfg, len(mbs) + len(extra), step) if moe else {}),
    }
