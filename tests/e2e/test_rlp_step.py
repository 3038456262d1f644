"""One real RLP step on one rank (gloo, CPU): finite metrics, the policy moves, and the EMA
teacher moves by exactly (1 - tau) * (theta - phi)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from megatron_rlp.data import ContextSampler
from megatron_rlp.data.batches import (
    build_rlp_inputs,
    split_microbatches,
    trimmed_microbatches,
    update_batch,
)
from megatron_rlp.rollout.thoughts import sample_thoughts_chunked
from megatron_rlp.rollout.vocab_parallel import token_logprobs_vocab_parallel
from megatron_rlp.train.rlp_step import local_contexts, rlp_step
from megatron_rlp.train.rlp_update import rlp_forward_step, rlp_loss
from megatron_rlp.train.timers import PhaseTimer
from megatron_rlp.train.update import optimizer_update

TINY = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=64",
    "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=4",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32", "rlp.ema_decay=0.9",
    "optimizer.lr=1e-2", "train.seed=7",
)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_rlp_steps_update_policy_and_teacher(state):
    cfg = state.cfg
    sampler = ContextSampler(state.corpus, cfg.rlp.min_prefix_tokens, cfg.rlp.max_prefix_tokens,
                             cfg.train.seed)
    tau = cfg.rlp.ema_decay
    assert not state.teacher.initialized
    theta0 = _params(state.policy)

    metrics = rlp_step(state, sampler, PhaseTimer())
    assert state.step == 1 and metrics["skipped"] == 0.0
    for key in ("loss", "reward_mean", "reward_std", "advantage_std", "s_ema", "s_pred",
                "grad_norm", "thought_len"):
        assert math.isfinite(metrics[key]), key
    assert metrics["grad_norm"] > 0
    assert 1 <= metrics["thought_len"] <= cfg.rlp.max_thought_tokens
    # S_ema is scored by the lazily initialised teacher (phi = theta0); reward = S_pred - S_ema.
    assert metrics["reward_mean"] == pytest.approx(metrics["s_pred"] - metrics["s_ema"], abs=1e-5)

    theta1 = _params(state.policy)
    assert any(not torch.equal(theta0[n], theta1[n]) for n in theta0), "policy did not move"
    phi1 = _params(state.teacher.model)
    for n, phi in phi1.items():  # phi0 = theta0 (lazy init), then one EMA update
        moved = phi - theta0[n]
        torch.testing.assert_close(moved, (1 - tau) * (theta1[n] - theta0[n]),
                                   atol=1e-7, rtol=1e-5)

    rlp_step(state, sampler, PhaseTimer())
    theta2, phi2 = _params(state.policy), _params(state.teacher.model)
    for n in phi2:
        torch.testing.assert_close(phi2[n] - phi1[n], (1 - tau) * (theta2[n] - phi1[n]),
                                   atol=1e-7, rtol=1e-5)
    assert all(p.dtype == torch.float32 and not p.requires_grad
               for p in state.teacher.model.parameters())


def _update_batch(state, step: int, sampler_seed: int, advantages) -> dict[str, torch.Tensor]:
    """Thoughts sampled for step `step`'s contexts, laid out for the update, with the
    advantages `advantages(rows)` (chosen by the test, not computed)."""
    tok, r = state.tokenizer, state.cfg.rlp
    sampler = ContextSampler(state.corpus, r.min_prefix_tokens, r.max_prefix_tokens,
                             sampler_seed)
    contexts, ids = local_contexts(state, sampler, step)
    prompts, _ = build_rlp_inputs(contexts, ids, state.corpus, r.max_prefix_tokens, tok.pad)
    thoughts = sample_thoughts_chunked(
        state.policy, prompts, 0, group_size=r.group_size, max_thought_tokens=r.max_thought_tokens,
        temperature=r.temperature, top_p=1.0, think_start=tok.think_start,
        think_end=tok.think_end, pad=tok.pad, vocab_size=tok.vocab_size, seed=5, step=step)
    return update_batch(prompts, thoughts, advantages(thoughts.tokens.shape[0]), r.group_size,
                        tok.pad, tok.think_start)


def test_update_raises_logprob_of_positive_advantage_thoughts(state):
    """The direction of the whole update path (batch layout, vocab-parallel log-probs, loss
    scaling, Megatron DDP and Adam): thoughts given A=+1 become likelier, A=-1 less likely."""
    tok, r = state.tokenizer, state.cfg.rlp
    batch = _update_batch(state, 1, 11, lambda rows: torch.tensor(
        [1.0 if i % 2 == 0 else -1.0 for i in range(rows)]))
    advantages = batch["advantages"]

    @torch.no_grad()
    def thought_logprob() -> torch.Tensor:  # [R] summed over each thought's tokens
        logits = state.policy(batch["tokens"], batch["positions"], None)
        index = batch["index"][..., None].expand(-1, -1, logits.shape[-1])
        lp = token_logprobs_vocab_parallel(logits.gather(1, index), batch["labels"],
                                           tok.vocab_size, r.temperature)
        return (lp * batch["mask"]).sum(1)

    before = thought_logprob()
    forward = partial(rlp_forward_step, 1.0, tok.vocab_size, r.temperature,
                      (r.clip_eps_low, r.clip_eps_high))
    _, _, applied = optimizer_update(state, [batch], forward, batch["tokens"].shape[1])
    assert applied
    delta = thought_logprob() - before
    assert delta[advantages > 0].mean() > 0 > delta[advantages < 0].mean(), delta


def test_trimmed_microbatches_give_the_same_loss_and_gradient(state):
    """Sorting rows by length and cutting each micro-batch to its own longest sequence (the
    update without pipeline parallelism) computes what the batch-wide padding computes."""
    tok, r = state.tokenizer, state.cfg.rlp
    batch = _update_batch(state, 2, 3, lambda rows: torch.linspace(-1.0, 1.0, rows))
    rows = len(batch["tokens"])
    assert int(batch["index"].max(1).values.min()) + 1 < batch["tokens"].shape[1]  # padding

    def loss_and_grads(mbs):
        for chunk in state.model_chunks:  # Megatron DDP accumulates into main_grad
            chunk.zero_grad_buffer()
        for p in state.policy.parameters():  # Megatron's fp32 optimizer aliases .grad to
            p.grad = None  # main_grad after a step; its zero_grad() drops them, do the same
        total = 0.0
        forward = partial(rlp_forward_step, len(mbs[0]["tokens"]) * len(mbs) / rows,
                          tok.vocab_size, r.temperature, (r.clip_eps_low, r.clip_eps_high))
        for mb in mbs:
            logits, loss_func = forward(iter([mb]), state.policy)
            loss, _ = loss_func(logits)
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.main_grad.clone() for n, p in state.policy.named_parameters()}

    full = split_microbatches(batch, 2)
    trimmed = trimmed_microbatches(batch, 2)
    assert [len(mb["tokens"]) for mb in trimmed] == [len(mb["tokens"]) for mb in full]
    assert sum(mb["tokens"].numel() for mb in trimmed) < sum(mb["tokens"].numel() for mb in full)
    loss_full, grads_full = loss_and_grads(full)
    loss_trim, grads_trim = loss_and_grads(trimmed)
    for chunk in state.model_chunks:
        chunk.zero_grad_buffer()
    assert loss_trim == pytest.approx(loss_full, rel=1e-6, abs=1e-7)
    assert any(bool(g.abs().max() > 0) for g in grads_full.values())
    for name, g in grads_full.items():  # micro-batch sums run in another order: fp32 noise
        err = (grads_trim[name] - g).abs().max().item()
        assert err <= 1e-5 * g.abs().max().item() + 1e-12, f"{name}: max |diff| {err:.2e}"


def test_update_projects_only_thought_positions(state):
    """The gradient forward computes logits at the thought-predicting positions only: the same
    loss and gradients as projecting every position and picking those afterwards."""
    tok, r = state.tokenizer, state.cfg.rlp
    batch = _update_batch(state, 3, 4, lambda rows: torch.linspace(1.0, -1.0, rows))
    eps = (r.clip_eps_low, r.clip_eps_high)

    def loss_and_grads(compute_logits):
        for chunk in state.model_chunks:
            chunk.zero_grad_buffer()
        for p in state.policy.parameters():
            p.grad = None
        logits = compute_logits()
        loss, _ = rlp_loss(batch, 1.0, tok.vocab_size, r.temperature, eps, logits)
        loss.backward()
        return logits.shape, float(loss.detach()), {
            n: p.main_grad.clone() for n, p in state.policy.named_parameters()}

    def every_position():
        logits = state.policy(batch["tokens"], batch["positions"], None)  # [B, S, V]
        return logits.gather(1, batch["index"][..., None].expand(-1, -1, logits.shape[-1]))

    def selected():
        return rlp_forward_step(1.0, tok.vocab_size, r.temperature, eps, iter([batch]),
                             state.model_chunks[0])[0]

    shape_ref, loss_ref, grads_ref = loss_and_grads(every_position)
    shape, loss, grads = loss_and_grads(selected)
    for chunk in state.model_chunks:
        chunk.zero_grad_buffer()
    assert shape == shape_ref == (*batch["index"].shape, 320)  # 261 ids padded to 320
    assert loss == pytest.approx(loss_ref, rel=1e-6, abs=1e-7)
    for name, g in grads_ref.items():
        err = (grads[name] - g).abs().max().item()
        assert err <= 1e-5 * g.abs().max().item() + 1e-12, f"{name}: max |diff| {err:.2e}"
