"""A real RLP step against an independent computation (tests/helpers/step_reference.py).

Dense and hybrid (Mamba-2) models, steps 1 and 2: at step 1 the lazily initialised teacher
equals the policy; at step 2 it is phi_1 = tau*theta_0 + (1-tau)*theta_1, which differs from
the policy theta_1 (checked: S_ema under theta_1 would miss by far more than the tolerance).
The step records its contexts, thoughts, S_ema, S_pred, rewards, advantages and sampling
log-probs (`MEGATRON_RLP_RECORD`); the reference rebuilds them with plain full forwards of
the saved weights, and its autograd gradient of the clipped surrogate is compared with the
gradient Megatron DDP accumulated in the step (before clipping; the step clips by the norm
it reports, so the reference is scaled the same way).

Tolerances (fp32 model, float64 reference arithmetic): log-probs, rewards and advantages
within 1e-5 absolute (observed <= 6e-7, dense and hybrid: a KV-cached decode and a full
forward differ only in reduction order); the gradient within 1e-4 of each tensor's largest
entry, the norm 1e-4 relative.
"""

from __future__ import annotations

import pytest
import torch
from helpers.step_reference import (
    assert_step_matches,
    float_weights,
    load_weights,
    reference_gradient,
    reference_step,
    teacher_history,
)

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.provider import build_model, unwrap_model
from megatron_rlp.train.builder import build_state
from megatron_rlp.train.record import ENV
from megatron_rlp.train.rlp_step import rlp_step
from megatron_rlp.train.samplers import make_context_sampler
from megatron_rlp.train.timers import PhaseTimer

COMMON = (
    "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.max_sequence_length=64",
    "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=5",
    "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32", "rlp.ema_decay=0.9",
    "optimizer.lr=1e-2", "optimizer.clip_grad=1.0", "train.seed=11", "device.num_threads=1",
    "precision.params_dtype=fp32",
)
MODELS = {
    "dense": ("examples/configs/tiny_cpu.yaml", ("model.hybrid_layer_pattern=*-*-",)),
    "hybrid": ("examples/configs/tiny_hybrid_cpu.yaml", (
        "model.hybrid_layer_pattern=M*-M-", "model.mamba_num_heads=8", "model.mamba_head_dim=16",
        "model.mamba_state_dim=16", "model.mamba_num_groups=2")),
}
STEPS = 2
ATOL = 1e-5


@pytest.fixture(scope="module", params=list(MODELS))
def run(request, tmp_path_factory):
    """Two recorded steps; the policy weights before each step and the step-2 gradient."""
    config, overrides = MODELS[request.param]
    cfg = load_config(config, (*COMMON, *overrides), world_size=1)
    record_dir = tmp_path_factory.mktemp(f"record-{request.param}")
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV, str(record_dir))
    distributed.initialize(cfg)
    try:
        state = build_state(cfg)
        sampler = make_context_sampler(state)
        thetas, metrics, grads = [float_weights(unwrap_model(state.policy).state_dict())], [], []
        for _ in range(STEPS):
            metrics.append(rlp_step(state, sampler, PhaseTimer()))
            # Megatron DDP's gradient of the step (clipped in place by the optimizer's coef).
            grads.append({n: p.main_grad.detach().clone()
                          for n, p in unwrap_model(state.policy).named_parameters()})
            thetas.append(float_weights(unwrap_model(state.policy).state_dict()))
        records = [torch.load(record_dir / f"step_{k:06d}_rank00000.pt") for k in (1, 2)]
        teacher_now = float_weights(state.teacher.model.state_dict())
        models = [build_model(cfg, state.tokenizer.vocab_size).eval() for _ in range(2)]
        yield dict(cfg=cfg, state=state, thetas=thetas, metrics=metrics, grads=grads,
                   records=records, teacher_now=teacher_now, models=models)
    finally:
        mp.undo()
        distributed.shutdown()


def _reference(run, k: int, teacher_weights=None):
    cfg, tok = run["cfg"], run["state"].tokenizer
    policy, teacher = run["models"]
    phis = teacher_history(run["thetas"], cfg.rlp.ema_decay)
    load_weights(policy, run["thetas"][k - 1])
    load_weights(teacher, teacher_weights or phis[k - 1])
    return reference_step(policy, teacher, run["records"][k - 1], run["state"].corpus.documents,
                          max_prefix=cfg.rlp.max_prefix_tokens, group_size=cfg.rlp.group_size,
                          vocab_size=tok.vocab_size, temperature=cfg.rlp.temperature,
                          think_start=tok.think_start, think_end=tok.think_end)


@pytest.mark.parametrize("k", [1, 2])
def test_step_signal_equals_reference(run, k):
    """S_ema, S_pred, rewards, advantages and per-thought log-probs of step k."""
    record = run["records"][k - 1]
    assert record["step"] == k
    docs = run["state"].corpus.documents
    for d, t, x in zip(record["doc_index"], record["position"], record["target"], strict=True):
        assert int(docs[int(d)][int(t)]) == int(x)  # the target is the document's token t
    ref = _reference(run, k)
    errors = assert_step_matches(record, ref, ATOL)
    print(f"step {k} max |step - reference|:", {n: f"{e:.1e}" for n, e in errors.items()})
    # the metrics are this record's means (one rank)
    assert run["metrics"][k - 1]["s_ema"] == pytest.approx(float(ref.s_ema.mean()), abs=ATOL)
    assert run["metrics"][k - 1]["reward_mean"] == pytest.approx(float(ref.rewards.mean()),
                                                                 abs=ATOL)


def test_teacher_at_step_2_is_not_the_policy(run):
    """Step 2's reference uses phi_1 != theta_1: scoring S_ema with the policy would miss by
    far more than the tolerance, so the comparison above can tell teacher from policy. The
    teacher the run holds after step 2 is phi_2 by RLP.md's rule."""
    wrong = _reference(run, 2, teacher_weights=run["thetas"][1])
    right = _reference(run, 2)
    assert (wrong.s_ema - right.s_ema).abs().max() > 100 * ATOL
    phi2 = teacher_history(run["thetas"], run["cfg"].rlp.ema_decay)[2]
    for name, value in run["teacher_now"].items():
        err = (value - phi2[name]).abs().max().item()
        assert err <= 1e-6 * (1 + phi2[name].abs().max().item()), f"teacher {name}: {err:.2e}"


@pytest.mark.parametrize("k", [1, 2])
def test_step_gradient_equals_autograd_on_reference(run, k):
    """Gradient of the clipped surrogate of step k: the reference's autograd gradient (on
    theta_{k-1}) vs Megatron DDP's gradient, and the step's reported (pre-clip) norm."""
    cfg, tok = run["cfg"], run["state"].tokenizer
    ref = _reference(run, k)
    policy = run["models"][0]
    load_weights(policy, run["thetas"][k - 1])
    record = run["records"][k - 1]
    _, grads = reference_gradient(
        policy, ref, record, group_size=cfg.rlp.group_size, vocab_size=tok.vocab_size,
        temperature=cfg.rlp.temperature, eps_low=cfg.rlp.clip_eps_low,
        eps_high=cfg.rlp.clip_eps_high, num_thoughts=len(ref.sequences))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    assert norm > 0
    assert run["metrics"][k - 1]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    coef = min(1.0, cfg.optimizer.clip_grad / (norm + 1e-6))  # Megatron's clip_grad_by_total_norm
    step_grads = run["grads"][k - 1]
    assert step_grads.keys() == grads.keys()
    for name, g in grads.items():
        want = g * coef
        err = (step_grads[name] - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item() + 1e-9, f"{name}: max |diff| {err:.2e}"
