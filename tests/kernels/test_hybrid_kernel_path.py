"""The hybrid model on the kernel path (Megatron's `MambaMixer` bound to mamba-ssm's and
Megatron's Triton kernels, run under Triton's interpreter: `helpers.triton_cpu`) against the
same model on the torch path (`models.mamba.ops`).

- The packed update's Mamba branch path (`models.mamba.branches.packed_ssm`): each layer runs
  the windows, then all (position, thought) branches as one batch from their forked states
  through mamba-ssm's chunk-scan kernel (`initial_states` per branch); loss and every
  gradient equal the torch path's.
- A whole RLP step (rollout with cached prefill and Triton decode, teacher scoring, update):
  same thoughts, rewards and loss within 1e-5; small shapes by default, tiny_hybrid_cpu.yaml
  as a slow case.

The models are built after the path is chosen, as a run builds them (the gated norm is then
mamba-ssm's Triton RMSNorm), from the same seed: same initial weights on both paths.
"""

from __future__ import annotations

import pytest
import torch
from helpers.packed_inputs import TOK, G, _inputs, _run
from helpers.tiny_models import tiny_model
from megatron.core.ssm.mamba_mixer import MambaMixer

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.mamba import adapter
from megatron_rlp.packing.update import packed_update_batches
from megatron_rlp.train.builder import build_state
from megatron_rlp.train.rlp_step import rlp_step
from megatron_rlp.train.rlp_update import rlp_forward_step
from megatron_rlp.train.samplers import make_context_sampler
from megatron_rlp.train.timers import PhaseTimer

TOL = 1e-5


def near(got: float, want: float) -> bool:
    return abs(got - want) <= TOL * max(1.0, abs(want))


def on_path(path: str, fn):
    adapter.select_kernels(force=path)
    try:
        return fn()
    finally:
        adapter.select_kernels(force=adapter.TORCH)


def packed_loss_and_grads():
    prompts, windows, thoughts, adv = _inputs()
    mbs = packed_update_batches(windows, prompts, thoughts, adv, G, 0, TOK.pad,
                                TOK.think_start, equal_width=False, rows_per_seq=6)
    with tiny_model(TOK.vocab_size, "hybrid") as model:
        norms = {type(m.norm).__mro__[1].__module__ for m in model.modules()
                 if isinstance(m, MambaMixer)}
        loss, grads = _run(model, rlp_forward_step, mbs, len(adv))
    return loss, grads, norms


def test_branch_path_through_the_scan_kernel(kernel_path, monkeypatch):
    calls = []
    kernel_scan = kernel_path.ssd.mamba_chunk_scan_combined

    def counted(*args, **kwargs):
        calls.append(kwargs.get("initial_states") is not None)
        return kernel_scan(*args, **kwargs)

    monkeypatch.setattr(kernel_path.ssd, "mamba_chunk_scan_combined", counted)
    got_loss, got, got_norms = on_path(adapter.MAMBA_SSM, packed_loss_and_grads)
    want_loss, want, want_norms = on_path(adapter.TORCH, packed_loss_and_grads)
    # 2 Mamba layers x (windows, branches from their forked states), forward only: the
    # branch scans carry initial_states; the backward is the kernel's own.
    assert calls == [False, True, False, True]
    assert got_norms == {"mamba_ssm.ops.triton.layernorm_gated"}  # the Triton gated norm
    assert want_norms == {adapter.ops.RMSNormGated.__module__}  # the torch gated norm
    assert near(got_loss, want_loss), (got_loss, want_loss)
    assert got.keys() == want.keys() and any("mixer" in name for name in got)
    for name in want:
        scale = max(1.0, float(want[name].abs().max()))
        err = float((got[name] - want[name]).abs().max())
        assert err <= TOL * scale, f"{name}: |kernel - torch| = {err:.3g}"


SMALL_STEP = ("model.hybrid_layer_pattern=M*-", "model.hidden_size=64",
              "model.ffn_hidden_size=128", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.max_sequence_length=64",
              "model.mamba_num_heads=4", "model.mamba_head_dim=16", "model.mamba_state_dim=8",
              "model.mamba_num_groups=2", "rlp.contexts_per_step=2", "rlp.group_size=2",
              "rlp.max_thought_tokens=3", "rlp.min_prefix_tokens=8",
              "rlp.max_prefix_tokens=16")


def one_step(config: str, overrides: tuple[str, ...]):
    cfg = load_config(config, overrides, world_size=1)
    distributed.initialize(cfg)
    try:
        state = build_state(cfg)
        trace: dict = {}
        metrics = rlp_step(state, make_context_sampler(state), PhaseTimer(), trace)
        return metrics, trace
    finally:
        distributed.shutdown()


def check_step(config: str, overrides: tuple[str, ...]) -> None:
    """Same thoughts, rewards and loss within 1e-5; the gradient norm within 1e-4 relative.
    (Not the updated weights: Adam's first step is lr * g / |g| per element, which turns
    rounding-level differences of near-zero gradients into lr-sized ones.)"""
    (got, got_trace) = on_path(adapter.MAMBA_SSM, lambda: one_step(config, overrides))
    (want, want_trace) = on_path(adapter.TORCH, lambda: one_step(config, overrides))
    assert torch.equal(got_trace["thoughts"].tokens, want_trace["thoughts"].tokens)
    torch.testing.assert_close(got_trace["rewards"], want_trace["rewards"], rtol=0, atol=TOL)
    for key in ("loss", "reward_mean", "s_pred", "s_ema"):
        assert near(got[key], want[key]), (key, got[key], want[key])
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert got["skipped"] == want["skipped"] == 0.0


def test_rlp_step_on_the_kernel_path(kernel_path):
    check_step("examples/configs/tiny_cpu.yaml", SMALL_STEP)


@pytest.mark.slow
def test_rlp_step_of_tiny_hybrid_cpu_on_the_kernel_path(kernel_path):
    """tiny_hybrid_cpu.yaml's model (3 Mamba layers of 16 heads x 32, state 32), a short step."""
    check_step("examples/configs/tiny_hybrid_cpu.yaml",
               ("rlp.contexts_per_step=1", "rlp.group_size=2", "rlp.max_thought_tokens=2",
                "rlp.min_prefix_tokens=16", "rlp.max_prefix_tokens=32"))
