"""S_ema cancels from the RLP update (issue 28, item 4).

S_ema is one value per context and the group advantages subtract the group mean, so
`A_i = G/(G-1) * (S_pred_i - mean_j S_pred_j)` whatever the teacher says. Checked on real
steps (one rank, gloo, CPU), dense and hybrid: the update of two consecutive steps (loss,
every gradient, the parameters after the optimizer step) is the same within fp32 rounding
when S_ema is replaced by arbitrary per-context values, and under `rlp.teacher_scoring=off`
(no teacher built, no scoring) and `log_interval` (scored only at logged steps).
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TINY, TINY_STEP

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.data import ContextSampler
from megatron_rlp.train import rlp_step as step_module
from megatron_rlp.train.builder import build_state
from megatron_rlp.train.timers import PhaseTimer

STEPS = 2


def _run(kind: str, scoring: str, monkeypatch, replace_s_ema=None, extra=()) -> dict:
    """Two RLP steps of a freshly built state; per step: metrics, every parameter's gradient
    (Megatron DDP's main_grad, kept after the optimizer step) and the parameters after it."""
    cfg = load_config("examples/configs/tiny_cpu.yaml",
                      (*TINY_STEP, *TINY[kind], f"rlp.teacher_scoring={scoring}", *extra),
                      world_size=1)
    distributed.initialize(cfg)
    try:
        state = build_state(cfg)
        with monkeypatch.context() as m:
            if replace_s_ema is not None:
                real = step_module.score_next_tokens
                m.setattr(step_module, "score_next_tokens",
                          lambda *a, **k: replace_s_ema(real(*a, **k)))
            sampler = ContextSampler(state.corpus, cfg.rlp.min_prefix_tokens,
                                     cfg.rlp.max_prefix_tokens, cfg.train.seed)
            out = []
            for _ in range(STEPS):
                before = {n: p.detach().clone() for n, p in state.policy.named_parameters()}
                trace = {}
                metrics = step_module.rlp_step(state, sampler, PhaseTimer(), trace)
                out.append({
                    "metrics": metrics, "trace": trace, "before": before,
                    "grads": {n: p.main_grad.detach().clone()
                              for n, p in state.policy.named_parameters()},
                    "params": {n: p.detach().clone() for n, p in state.policy.named_parameters()},
                })
        return {"steps": out, "teacher": state.teacher}
    finally:
        distributed.shutdown()


def _random_per_context(s_ema: torch.Tensor) -> torch.Tensor:
    """Arbitrary per-context values far from the teacher's (one per context, not per thought)."""
    gen = torch.Generator().manual_seed(int(s_ema.numel()))
    return torch.empty_like(s_ema).uniform_(-12.0, 3.0, generator=gen)


def _assert_same_update(got: dict, want: dict) -> None:
    """Same thoughts, advantages within 4 fp32 ulps of the reward scale, and the
    gradient and parameters as close as that rounding allows (the gradient is linear in A)."""
    eps = torch.finfo(torch.float32).eps
    for k, (a, b) in enumerate(zip(got["steps"], want["steps"], strict=True), start=1):
        ta, tb = a["trace"]["thoughts"], b["trace"]["thoughts"]
        assert torch.equal(ta.tokens, tb.tokens)  # the rollout never reads S_ema
        if k == 1:  # same parameters: bitwise; after that they differ by rounding
            assert torch.equal(ta.s_pred, tb.s_pred)
        torch.testing.assert_close(ta.s_pred, tb.s_pred, atol=1e-5, rtol=0)
        scale = max(a["trace"]["rewards"].abs().max(), b["trace"]["rewards"].abs().max())
        d_adv = (a["trace"]["advantages"] - b["trace"]["advantages"]).abs().max()
        assert d_adv <= 4 * eps * scale, f"step {k}: advantages differ by {d_adv:.2e}"
        rel = float(d_adv / b["trace"]["advantages"].abs().max())  # A's relative rounding
        # The surrogate's value is -mean(rho * A) with rho = 1: zero up to rounding.
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], abs=1e-6)
        assert any(bool(g.abs().max() > 0) for g in b["grads"].values())
        for name, g in b["grads"].items():
            err = (a["grads"][name] - g).abs().max().item()
            assert err <= 16 * rel * g.abs().max().item() + 1e-10, \
                f"step {k} grad {name}: {err:.2e} (A rounding {rel:.1e})"
        moved = max((p - b["before"][n]).abs().max().item() for n, p in b["params"].items())
        assert moved > 1e-4  # the parameters moved well beyond the tolerance below
        for name, p in b["params"].items():
            err = (a["params"][name] - p).abs().max().item()
            assert err <= 1e-6, f"step {k} param {name}: {err:.2e}"


@pytest.mark.parametrize("kind", ["dense", "hybrid"])
def test_update_does_not_depend_on_s_ema(kind, monkeypatch):
    plain = _run(kind, "every_step", monkeypatch)
    replaced = _run(kind, "every_step", monkeypatch, replace_s_ema=_random_per_context)
    off = _run(kind, "off", monkeypatch)
    for run in (plain, replaced):  # the reward level follows S_ema, the update does not
        assert all(s["metrics"]["teacher_scored"] == 1.0 for s in run["steps"])
    assert plain["steps"][0]["metrics"]["reward_mean"] != pytest.approx(
        replaced["steps"][0]["metrics"]["reward_mean"], abs=1e-2)
    _assert_same_update(replaced, plain)
    _assert_same_update(off, plain)
    assert off["teacher"] is None
    assert all(s["metrics"]["teacher_scored"] == 0.0 and "reward_mean" not in s["metrics"]
               and "s_ema" not in s["metrics"] for s in off["steps"])


def test_log_interval_scores_only_logged_steps(monkeypatch):
    """`log_interval` with train.log_interval=3: step 1 is scored (as every_step scores it),
    step 2 is not; the teacher is kept either way and the update is unchanged."""
    plain = _run("dense", "every_step", monkeypatch)
    logged = _run("dense", "log_interval", monkeypatch, extra=("train.log_interval=3",))
    _assert_same_update(logged, plain)
    first, second = (s["metrics"] for s in logged["steps"])
    assert first["teacher_scored"] == 1.0 and second["teacher_scored"] == 0.0
    assert first["reward_mean"] == plain["steps"][0]["metrics"]["reward_mean"]
    assert "reward_mean" not in second and "s_ema" not in second
    assert logged["teacher"].initialized  # the shadow follows the policy at every step
