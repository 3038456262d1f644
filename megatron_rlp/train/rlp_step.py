"""One RLP step (RLP.md, "One training step"), readable top to bottom:

    contexts -> rollout (G thoughts each, S_pred) -> teacher S_ema -> reward, advantages
    -> clipped-surrogate update -> EMA teacher update

Contexts are drawn globally from (seed, step) and split over data-parallel ranks; a
context's G thoughts stay on its rank, so group advantages need no communication. The
metrics are global-batch values on every rank.

The update's micro-batch layouts, forward step and loss are `train.rlp_update`; the metrics
`train.rlp_metrics`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from torch import Tensor

from megatron_rlp.config import cascade_decode
from megatron_rlp.data import ContextSampler
from megatron_rlp.data.batches import DocumentWindows, build_rlp_inputs
from megatron_rlp.models.fp8 import rollout_precision, token_multiple
from megatron_rlp.models.moe_routing import (
    RolloutRouting,
    UpdateAgreement,
    routers,
    with_routing_metrics,
)
from megatron_rlp.objective import group_advantages, info_gain_reward
from megatron_rlp.packing.prefill import SharedWindows
from megatron_rlp.rollout.template import apply_template, build_template
from megatron_rlp.rollout.thoughts import PromptBatch, ThoughtBatch, sample_thoughts_chunked
from megatron_rlp.scoring.ema_teacher import teacher_scores
from megatron_rlp.scoring.horizon import horizon_scores
from megatron_rlp.scoring.next_token import score_next_tokens
from megatron_rlp.scoring.reference import reference_logprobs
from megatron_rlp.train import faults
from megatron_rlp.train.builder import TrainState
from megatron_rlp.train.moe_losses import router_losses
from megatron_rlp.train.ntp_mix import ntp_pass
from megatron_rlp.train.record import record_step
from megatron_rlp.train.rlp_metrics import rlp_metrics
from megatron_rlp.train.rlp_update import (
    UPDATE_LAYOUTS,
    microbatch_scale,
    packed_attention,
    rlp_forward_step,
    update_layout,
)
from megatron_rlp.train.timers import PhaseTimer
from megatron_rlp.train.update import optimizer_update


def local_contexts(state: TrainState, sampler: ContextSampler, step: int):
    """This data-parallel rank's slice of the step's global contexts, with their global ids."""
    r = state.cfg.rlp
    contexts = sampler.sample(step, r.contexts_per_step, r.positions_per_document)
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    per_rank = len(contexts) // dp
    ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    return [contexts[i] for i in ids], ids


@dataclass
class ScoredRollout:
    """One step's contexts on this rank, their thoughts and their RLP signal (RLP.md, steps
    1-4). Rows are context-major: row c*G + g is thought g of context c."""

    contexts: list
    ids: list[int]            # global context ids
    prompts: PromptBatch      # the policy's prompts (`rlp.thought_template` applied)
    windows: DocumentWindows  # the policy's shared windows (shared prefill, packed update)
    thoughts: ThoughtBatch
    # [C] log pbar_phi(x_t | x_<t); None when the teacher did not score this step
    # (`rlp.teacher_scoring`), and then `rewards` is S_pred alone: the same advantages.
    s_ema: Tensor | None
    rewards: Tensor           # [C*G] S_pred - S_ema (S_pred when `s_ema` is None)
    advantages: Tensor        # [C*G] group advantages
    # The raw document windows the teacher read (== `windows` with the `none` template) and
    # the lead fed before each thought (`rollout.template`: `<think>`, or `after <think>`).
    raw_windows: DocumentWindows | None = None
    lead: tuple[int, ...] = ()
    # MoE models: [C*G, L, layers, E / 8] uint8, the experts that predicted each thought
    # token in the rollout (bit-packed maps), this rank's layers (`models.moe_routing`;
    # None without E layers on this pipeline stage).
    routing: Tensor | None = None


# The MoE update's own metrics (models.moe_routing.with_routing_metrics), means over
# micro-batches and data-parallel ranks; `routing_agreement` where `records_routing`.
MOE_METRICS = ("routing_agreement", "moe_expert_load_max", "moe_dropped_fraction")


def records_routing(cfg) -> bool:
    """Whether the rollout records routing for `routing_agreement`: the model has MoE
    layers. Any layout: each pipeline stage and sequence-parallel rank compares its own
    routers, and the ranks combine (`models.moe_routing.UpdateAgreement`)."""
    return "E" in cfg.model.hybrid_layer_pattern


def rollout_and_score(state: TrainState, sampler: ContextSampler, step: int,
                      timer: PhaseTimer | None = None) -> ScoredRollout:
    """The phases of step `step` before the update: draw this rank's contexts, sample G thoughts
    each (S_pred), score S_ema with the EMA teacher, rewards and group advantages. Shared by
    `rlp_step` and the `megatron.training.pretrain()` plugin (megatron_rlp/plugin.py).

    S_ema is scored only at the steps `rlp.teacher_scoring` asks for (`teacher_scores`); at
    the others the rewards are S_pred alone, which gives the same group advantages."""
    cfg, tok, r = state.cfg, state.tokenizer, state.cfg.rlp
    timer = timer or (lambda phase: contextlib.nullcontext())
    template = build_template(r.thought_template, tok)
    teacher = state.teacher.model if state.teacher is not None else None
    # Under FP8 training, rollouts and scoring run in bf16 unless precision.fp8_rollouts.
    with timer("rollout"), rollout_precision(cfg.precision, state.policy,
                                             *([teacher] if teacher is not None else [])):
        contexts, ids = local_contexts(state, sampler, step)
        raw_prompts, raw_windows = build_rlp_inputs(contexts, ids, state.corpus,
                                                    r.max_prefix_tokens, tok.pad, state.device)
        # The policy reads the template around x_<t; the teacher keeps the raw windows.
        prompts, windows = apply_template(template, raw_prompts, raw_windows, tok.pad)
        state.policy.eval()
        routing = RolloutRouting(state.policy) if records_routing(cfg) else None
        with routing or contextlib.nullcontext():
            thoughts = sample_thoughts_chunked(
                state.policy, prompts, r.rollout_chunk_contexts, group_size=r.group_size,
                max_thought_tokens=r.max_thought_tokens, temperature=r.temperature,
                top_p=r.top_p, think_start=list(template.lead), think_end=tok.think_end,
                pad=tok.pad, vocab_size=tok.vocab_size, seed=cfg.train.seed, step=step,
                shared=(SharedWindows.from_windows(windows, prompts, cascade_decode(cfg),
                                                   r.compile_decode)
                        if r.share_prefixes else None),
                routing=routing)
        state.policy.train()
    scored = state.teacher is not None and teacher_scores(r.teacher_scoring, step,
                                                          cfg.train.log_interval)
    with timer("scoring"), rollout_precision(cfg.precision,
                                             *([teacher] if teacher is not None else [])):
        if state.teacher is not None and not state.teacher.initialized:
            state.teacher.initialize_from(state.policy)  # lazy phi <- theta
        reference = getattr(state, "reference", None)
        if reference is not None and not reference.initialized:
            reference.initialize_from(state.policy)  # pi_ref: the policy of the first RLP step
        s_ema, baseline = None, torch.zeros_like(thoughts.s_pred)
        if r.reward_tokens > 1:  # the multi-token reward (scoring/horizon.py); k = 1: as is
            state.policy.eval()
            thoughts.s_pred, s_ema = horizon_scores(
                state.policy, teacher if scored else None, contexts, state.corpus.documents,
                prompts, thoughts, template.lead, tok.think_end, r.reward_tokens,
                r.reward_discount, vocab_size=tok.vocab_size, pad=tok.pad,
                window=cfg.model.max_sequence_length)
            state.policy.train()
        elif scored:
            w = raw_windows  # S_ema conditions on the raw prefix x_<t (RLP.md), template or not
            s_ema = score_next_tokens(teacher, w.tokens, w.valid, w.rows, w.cols, w.targets,
                                      tok.vocab_size)
        if s_ema is not None:
            baseline = s_ema.repeat_interleave(r.group_size)
        # Any per-context baseline cancels from the group advantages (scoring/ema_teacher.py).
        rewards = info_gain_reward(thoughts.s_pred, baseline)
        advantages = group_advantages(rewards.view(-1, r.group_size)).view(-1)
    return ScoredRollout(contexts, ids, prompts, windows, thoughts, s_ema, rewards, advantages,
                         raw_windows=raw_windows, lead=template.lead,
                         routing=routing.result() if routing is not None else None)


def _routing_faults(state: TrainState, ro: ScoredRollout, step: int) -> None:
    """Test hooks (train/faults.py) between the rollout and the update of `step`, on
    pipeline stage 0, the first MoE layer (tests/distributed/test_moe_layouts.py):
    `router_flip` negates its router (the update routes elsewhere than the rollout did),
    `routing_record_flip` inverts the rollout's record of it (`routing_agreement` = 0)."""
    found = routers(state.policy)
    if not found or not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        return
    if faults.planned("router_flip", step, every_rank=True):
        with torch.no_grad():
            found[0].weight.neg_()
    if faults.planned("routing_record_flip", step, every_rank=True) and ro.routing is not None:
        ro.routing[:, :, 0] = ~ro.routing[:, :, 0]


def rlp_step(state: TrainState, sampler: ContextSampler, timer: PhaseTimer,
             trace: dict | None = None) -> dict[str, float]:
    """Run RLP step `state.step + 1`; return its global metrics. A `trace` dict receives this
    rank's prompts, windows, thoughts, rewards and advantages (train/record.py;
    tools/bench_rlp.py compares them across paths)."""
    cfg, tok = state.cfg, state.tokenizer
    r, step = cfg.rlp, state.step + 1
    ro = rollout_and_score(state, sampler, step, timer)
    _routing_faults(state, ro, step)
    with timer("update"):
        sp = cfg.parallel.sequence_parallel
        multiple = cfg.parallel.tensor_model_parallel_size if sp else 1
        multiple = math.lcm(multiple, token_multiple(cfg.precision))  # FP8 GEMM alignment
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rows = len(ro.thoughts.tokens)
        layout = update_layout(cfg, rows)  # `unpacked` or `packed` (train/rlp_update.py)
        # The pipeline schedule sends one activation shape for all micro-batches.
        mbs = UPDATE_LAYOUTS[layout](cfg, tok, ro, multiple, equal_width=pp > 1)
        loss_options = dict(logp_old_source=r.logp_old_source, tis_cap=r.tis_cap)
        if r.kl_coef > 0:  # the frozen reference's log-probs of the same thought tokens
            loss_options["kl_coef"] = r.kl_coef
            for mb in mbs:
                mb["logp_ref"] = reference_logprobs(state.reference.model, mb, tok.vocab_size,
                                                    r.temperature)
        forward = partial(rlp_forward_step, microbatch_scale(mbs, rows), tok.vocab_size,
                          r.temperature, (r.clip_eps_low, r.clip_eps_high),
                          attention=packed_attention(cfg) if layout == "packed" else "mask",
                          **loss_options)
        moe = "E" in cfg.model.hybrid_layer_pattern
        agreement = UpdateAgreement(routers(state.policy)) if records_routing(cfg) else None
        if moe:  # expert load, dropped tokens, routing agreement (models/moe_routing.py)
            forward = with_routing_metrics(forward, cfg.model.moe_router_topk, agreement)
        ntp_losses, extra = [], []
        if r.ntp_loss_coef > 0:  # NTP on the raw windows, gradients added (train/ntp_mix.py)
            extra.append(ntp_pass(ro.raw_windows, r.ntp_loss_coef, multiple, ntp_losses))
        losses, grad_norm, applied = optimizer_update(state, mbs, forward,
                                                      mbs[0]["tokens"].shape[1],
                                                      extra_passes=extra)
        # A skipped (non-finite) update leaves policy and teacher as they were.
        if applied and state.teacher is not None:
            state.teacher.update(state.policy)
        state.step = step  # the step's batch is consumed either way (keyed by the step)
    # The one step hook (train/record.py): fills `trace`, and writes MEGATRON_RLP_RECORD files.
    record_step(step, ro, trace)
    optional = {}  # the knobs' metrics, only when they are on
    if r.kl_coef > 0:
        optional["kl_ref"] = [d["kl_ref"] for d in losses]
    if r.ntp_loss_coef > 0:
        optional["ntp_loss"] = ntp_losses
    if agreement is not None:  # every stage's and rank's routers (a collective: TP x PP)
        optional["routing_agreement"] = agreement.values()
    if moe:
        for k in MOE_METRICS[1:]:
            optional[k] = [d[k] for d in losses]
    metrics = rlp_metrics(ro, losses, optional, grad_norm, applied, r.group_size)
    if moe:  # Megatron's tracked router losses (a collective: every rank)
        metrics.update(router_losses(cfg, len(mbs) + len(extra), step))
    state.consumed_tokens += int(metrics["tokens"])
    return metrics
