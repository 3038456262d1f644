"""The update's layers under torch.compile (`train.compile_update`, train/compiled_update.py)
against the eager update.

Real RLP steps (one rank, gloo, CPU, Megatron DDP and optimizer) of the tiny models, eager and
compiled from the same seed: the rollout is the same (it never runs compiled), and the
update's loss, every gradient (DDP's `main_grad`) and the parameters after the optimizer step
agree within fp32 rounding. The default suite runs the hybrid model (split tree attention,
the CPU default; Mamba layers eager) through `aot_eager`: Dynamo + AOTAutograd, the same
graphs without C++ code generation. Marked slow (a cold inductor compile takes ~40 CPU s):
dense and hybrid under inductor, the key's backend, and activation recomputation.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.data import ContextSampler
from megatron_rlp.train import compiled_update
from megatron_rlp.train import rlp_step as step_module
from megatron_rlp.train.builder import build_state
from megatron_rlp.train.loop import kernel_metrics
from megatron_rlp.train.timers import PhaseTimer

TINY = {
    "dense": ("model.hybrid_layer_pattern=*-*-",),
    "hybrid": ("model.hybrid_layer_pattern=M*-M-", "model.mamba_num_heads=4",
               "model.mamba_head_dim=16", "model.mamba_state_dim=8", "model.mamba_num_groups=2"),
}
COMMON = ("model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
          "model.num_query_groups=2", "model.max_sequence_length=64",
          "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=4",
          "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32", "train.seed=7",
          "model.packed_attention=split",
          # Adam with eps 1 is SGD-like (lr * g / (1 + |g|)): rounding noise on a near-zero
          # gradient stays rounding noise in the parameters (see test_teacher_cancellation).
          "optimizer.lr=1.0", "optimizer.adam_eps=1.0")


@pytest.fixture(autouse=True)
def _warn_again():
    """Each test sees the once-per-process warnings (`compiled_update._warn_once`)."""
    compiled_update._warned.clear()


def _run(kind: str, compile_update: bool, steps: int = 1, extra=()) -> list[dict]:
    """`steps` RLP steps of a freshly built state; per step: metrics, the rollout, every
    parameter's gradient (DDP's main_grad) and the parameters after the optimizer step, and
    the update's graph compilations so far."""
    cfg = load_config("examples/configs/tiny_cpu.yaml",
                      (*COMMON, *TINY[kind], f"train.compile_update={compile_update}", *extra),
                      world_size=1)
    distributed.initialize(cfg)
    try:
        state = build_state(cfg)
        sampler = ContextSampler(state.corpus, cfg.rlp.min_prefix_tokens,
                                 cfg.rlp.max_prefix_tokens, cfg.train.seed)
        out = []
        for _ in range(steps):
            trace = {}
            metrics = step_module.rlp_step(state, sampler, PhaseTimer(), trace)
            out.append({
                "metrics": metrics, "thoughts": trace["thoughts"].tokens,
                "grads": {n: p.main_grad.detach().clone()
                          for n, p in state.policy.named_parameters()},
                "params": {n: p.detach().clone() for n, p in state.policy.named_parameters()},
                "compiles": compiled_update.compile_count(),
                "compiled_now": any(compiled_update.is_compiled(m)
                                    for m in state.policy.modules()),
            })
        return out
    finally:
        distributed.shutdown()


def _assert_same_update(got: dict, want: dict) -> None:
    """Same rollout; loss, every gradient and every parameter within fp32 rounding."""
    assert torch.equal(got["thoughts"], want["thoughts"])
    assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=1e-5, abs=1e-7)
    assert any(bool(g.abs().max() > 0) for g in want["grads"].values())
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # a cold inductor compile: ~40 CPU s, 75 s wall on a loaded 2-core machine
def test_inductor_update_equals_eager_dense_split():
    """Inductor (the key's backend), the packed update with the split attention: same update
    as eager; a second step of other widths reuses the dynamic-shape graphs; the compiled
    calls are gone outside the update (rollouts and scoring stay eager)."""
    eager = _run("dense", False)
    start = compiled_update.compile_count()
    compiled = _run("dense", True, steps=2)
    _assert_same_update(compiled[0], eager[0])
    first = compiled[0]["compiles"] - start
    assert 0 < first <= 12  # graphs per layer kind (and the pieces around core attention)
    assert compiled[1]["compiles"] == compiled[0]["compiles"]  # no recompile
    assert not any(step["compiled_now"] for step in compiled)
    assert kernel_metrics()["update_compiles"] == compiled_update.compile_count()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiled_update, "BACKEND", "aot_eager")


@pytest.mark.parametrize("kind, extra", [
    ("hybrid", ()),
    pytest.param("dense", ("train.recompute_granularity=selective",), marks=pytest.mark.slow),
    pytest.param("dense", ("train.recompute_granularity=full",), marks=pytest.mark.slow),
])
def test_traced_update_equals_eager(aot_eager, kind, extra):
    """A hybrid model (Mamba layers eager, one warning) and, slow, activation recomputation
    (selective: the core attention's checkpoint outside the graph; full: the layers' forward
    without gradients, then rerun compiled in the backward): the traced graphs give the
    eager update."""
    eager = _run(kind, False, extra=extra)
    if kind == "hybrid":
        with pytest.warns(UserWarning, match="train.compile_update: .*layers run eager"):
            compiled = _run(kind, True, steps=2, extra=extra)
        # the second step's micro-batches (other widths) reuse the dynamic-shape graphs
        assert compiled[1]["compiles"] == compiled[0]["compiles"]
        assert not any(step["compiled_now"] for step in compiled)
    else:
        compiled = _run(kind, True, extra=extra)
    _assert_same_update(compiled[0], eager[0])


@pytest.mark.slow
@pytest.mark.parametrize("kind, extra", [
    ("dense", ("train.recompute_granularity=full",)),
    ("hybrid", ("model.packed_attention=mask",)),
])
def test_inductor_update_equals_eager_slow(kind, extra):
    eager = _run(kind, False, extra=extra)
    compiled = _run(kind, True, extra=extra)
    _assert_same_update(compiled[0], eager[0])


@pytest.mark.parametrize("override, match", [
    ("parallel.tensor_model_parallel_size=2", "tensor_model_parallel_size=2"),
    ("parallel.pipeline_model_parallel_size=2", "pipeline_model_parallel_size=2"),
])
def test_eager_reasons(override, match):
    cfg = load_config("examples/configs/tiny_cpu.yaml", (override,), world_size=2)
    assert match in compiled_update.eager_reason(cfg)
    assert compiled_update.eager_reason(load_config("examples/configs/tiny_cpu.yaml", (),
                                                    world_size=1)) is None


@pytest.mark.parametrize("kind, eager_kind", [("moe", "MoETransformerLayer"),
                                              ("hybrid", "LocalMambaLayer")])
def test_moe_and_mamba_layers_stay_eager(kind, eager_kind):
    """Inside the block only the attention and MLP layers (and no core attention) have a
    compiled call, with one warning naming the eager kinds; after it none has."""
    from helpers.tiny_models import tiny_model

    from megatron_rlp.tokenizer import ByteTokenizer

    with tiny_model(ByteTokenizer().vocab_size, kind) as model:
        layers = list(model.decoder.layers)
        with pytest.warns(UserWarning, match=f"train.compile_update: {eager_kind}"), \
                compiled_update.compiled_layers([model], "aot_eager") as n:
            compiled = [compiled_update.is_compiled(layer) for layer in layers]
            cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
            assert cores and all(compiled_update.is_compiled(c) for c in cores)  # eager call
        assert n == sum(compiled) == sum(type(la).__name__ != eager_kind for la in layers)
        assert not any(compiled_update.is_compiled(m) for m in model.modules())
