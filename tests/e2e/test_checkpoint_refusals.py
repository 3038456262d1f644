"""Every checkpoint refusal and reset the README promises, each with its own test.

Refusals (one `error:` line, exit 2, checkpoint untouched, before any training):
- another tokenizer, i.e. another padded vocabulary (`data.tokenizer`);
- switching `parallel.use_distributed_optimizer`, either way;
- a `dp_reshardable` distributed-optimizer checkpoint loaded into another TP/PP (PP=2, 2 gloo
  processes).
Accepted:
- a `fully_reshardable` checkpoint of one rank loaded into TP=2 (2 gloo processes; PP=2 and
  DP=2 with `-m slow`) and saved again at once: every tensor (policy, teacher, Adam moments)
  is the same global tensor.
Resets:
- a warm start from another objective (NTP -> RLP) takes the policy weights only: step 0, no
  Adam state, a fresh scheduler, an uninitialised teacher that the first RLP step sets to the
  loaded policy;
- a skipped non-finite step leaves the scheduler and every RNG exactly as they were.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoint_helpers import (
    CONFIG,
    ROOT,
    SMALL,
    in_process,
    latest,
    main,
    ok,
    read_tensors,
)
from test_checkpoint_faults import assert_one_line_error, snapshot

DIST_OPT = "parallel.use_distributed_optimizer=true"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def torchrun(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "pretrain_rlp.py", "--config",
           CONFIG, *SMALL, *overrides]
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_RLP_FAULTS"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def local_ckpt(tmp_path_factory) -> Path:
    """RLP, local optimizer, step 2."""
    root = tmp_path_factory.mktemp("local") / "ckpt"
    ok("train.steps=2", f"train.save={root}")
    return root


@pytest.fixture(scope="module")
def dist_ckpts(tmp_path_factory) -> dict[str, Path]:
    """RLP, distributed optimizer, step 2, one per format (one rank)."""
    out = {}
    for fmt in ("dp_reshardable", "fully_reshardable"):
        root = tmp_path_factory.mktemp(fmt) / "ckpt"
        ok("train.steps=2", DIST_OPT, f"train.dist_optimizer_checkpoint={fmt}",
           f"train.save={root}")
        out[fmt] = root
    return out


def _refused(root: Path, *overrides: str, needles: tuple[str, ...]) -> None:
    before = snapshot(root)
    run = main("train.steps=4", f"train.load={root}", *overrides)
    assert_one_line_error(run, 2, *needles)
    assert "[rlp step" not in run.out and snapshot(root) == before


def test_other_tokenizer_is_refused(local_ckpt):
    _refused(local_ckpt, "data.tokenizer=tests/assets/tiny_bpe/tokenizer.json",
             needles=("does not fit the configured model", "padded_vocab_size=320 (config: 512)",
                      "check data.tokenizer"))


@pytest.mark.parametrize("override, shown", [
    ("model.rotary_base=10000", "rotary_base=1000000 (config: 10000)"),
    ("model.norm_epsilon=1e-5", "norm_epsilon=1e-06 (config: 1e-05)"),
])
@pytest.mark.parametrize("objective", ["rlp", "ntp"])  # a resume, and a warm start
def test_a_field_that_changes_the_function_is_refused(local_ckpt, override, shown, objective):
    """RoPE's theta and the norms' epsilon change what the loaded weights compute, with the
    same tensor shapes: resuming or warm-starting with another value is refused, naming the
    checkpoint's value to set."""
    key, value = shown.split(" ")[0].split("=")
    _refused(local_ckpt, override, f"train.objective={objective}",
             needles=("does not fit the configured model", shown, f"set model.{key}={value}"))


def test_other_precision_refuses_the_optimizer_state_and_loads_the_weights(local_ckpt):
    """fp32 Adam state does not move into a bf16 run (fp32 main weights there): one line that
    names both settings; with train.load_optimizer=false the weights resume in bf16."""
    _refused(local_ckpt, "precision.params_dtype=bf16",
             needles=("precision.params_dtype=fp32", "bf16 run", "train.load_optimizer=false"))
    run = ok("train.steps=3", f"train.load={local_ckpt}", "precision.params_dtype=bf16",
             "train.load_optimizer=false", "train.save=null")
    assert "fresh optimizer state" in run.out and "[rlp step     3]" in run.out


def test_switching_to_the_distributed_optimizer_is_refused(local_ckpt):
    _refused(local_ckpt, DIST_OPT, needles=("holds local optimizer state",
                                            "parallel.use_distributed_optimizer=false"))


def test_switching_to_the_local_optimizer_is_refused(dist_ckpts):
    _refused(dist_ckpts["dp_reshardable"], needles=("holds distributed optimizer state",
                                                    "parallel.use_distributed_optimizer=true"))


def test_dp_reshardable_into_another_pp_is_refused(dist_ckpts):
    root = dist_ckpts["dp_reshardable"]
    before = snapshot(root)
    proc = torchrun("train.steps=4", DIST_OPT, "parallel.pipeline_model_parallel_size=2",
                    f"train.load={root}")
    assert proc.returncode != 0, proc.stdout[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "dp_reshardable format, which loads only with the same TP/PP" in errors[0]
    assert "fully_reshardable" in errors[0]
    assert "[rlp step" not in proc.stdout and snapshot(root) == before


@pytest.mark.parametrize("layout", [
    pytest.param(("parallel.tensor_model_parallel_size=2",), id="tp2"),
    # The same for PP=2 and DP=2 (2 more torchrun starts): `pytest -m slow`.
    pytest.param(("parallel.pipeline_model_parallel_size=2",), id="pp2", marks=pytest.mark.slow),
    pytest.param((), id="dp2", marks=pytest.mark.slow),
])
def test_fully_reshardable_loads_into_another_layout(dist_ckpts, tmp_path, layout):
    """One-rank checkpoint -> 2 ranks (re-saved at once, same step): the same global tensors."""
    src = dist_ckpts["fully_reshardable"]
    proc = torchrun("train.steps=2", DIST_OPT, *layout,
                    "train.dist_optimizer_checkpoint=fully_reshardable", f"train.load={src}",
                    f"train.save={tmp_path / 'new'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed into a new layout" in proc.stdout
    a, b = read_tensors(latest(src)), read_tensors(latest(tmp_path / "new"))
    assert any(k.startswith("optimizer.") and "exp_avg_sq" in k for k in a)
    assert any(k.startswith("ema.") for k in a)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after TP=1 -> TP=2, e.g. {differ[:3]}"


def test_warm_start_from_ntp_resets_optimizer_scheduler_and_teacher(tmp_path):
    from megatron_rlp import distributed
    from megatron_rlp.checkpoint import load_checkpoint
    from megatron_rlp.config import load_config
    from megatron_rlp.models.provider import unwrap_model
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    ntp = tmp_path / "ntp"
    ok("train.objective=ntp", "train.steps=3", f"train.save={ntp}")
    saved = read_tensors(latest(ntp))
    assert any(k.startswith("optimizer.") for k in saved)  # it has Adam state to not load
    with in_process():
        cfg = load_config(CONFIG, (*SMALL, "rlp.ema_decay=0.5"), world_size=1)
        distributed.initialize(cfg)
        try:
            state = build_state(cfg)
            how = load_checkpoint(state, str(ntp))
            assert how.startswith("warm-started")
            assert state.step == 0 and state.consumed_tokens == 0
            assert state.scheduler.num_steps == 0
            assert all(len(o.state) == 0 for o in _torch_optimizers(state))
            assert not state.teacher.initialized
            policy = unwrap_model(state.policy)
            for name, value in policy.state_dict().items():
                if f"model.{name}" in saved:
                    assert torch.equal(value, saved[f"model.{name}"]), name
            theta0 = {n: p.detach().clone() for n, p in policy.named_parameters()}
            rlp_step(state, make_context_sampler(state), PhaseTimer())
            assert state.step == 1 and state.scheduler.num_steps == 1
            steps = {int(s["step"]) for o in _torch_optimizers(state) for s in o.state.values()}
            assert steps == {1}  # Adam's bias correction starts over
            tau = cfg.rlp.ema_decay  # the teacher started from the loaded policy (phi_0 = theta_0)
            for name, phi in state.teacher.model.named_parameters():
                want = tau * theta0[name] + (1 - tau) * dict(policy.named_parameters())[name]
                torch.testing.assert_close(phi, want, rtol=1e-6, atol=1e-7)
        finally:
            distributed.shutdown()


def _torch_optimizers(state) -> list[torch.optim.Optimizer]:
    inner = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    return [o.optimizer for o in inner]


def test_skipped_step_leaves_scheduler_and_rng_unchanged():
    from megatron.core import tensor_parallel

    from megatron_rlp import distributed
    from megatron_rlp.config import load_config
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler
    from megatron_rlp.train.timers import PhaseTimer

    def rng_states():
        return (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(),
                {k: v.clone() for k, v in
                 tensor_parallel.get_cuda_rng_tracker().get_states().items()})

    with in_process(faults="nan_grad@2"):
        cfg = load_config(CONFIG, (*SMALL, "optimizer.lr_warmup_steps=3"), world_size=1)
        distributed.initialize(cfg)
        try:
            state = build_state(cfg)
            sampler = make_context_sampler(state)
            rlp_step(state, sampler, PhaseTimer())
            sched, lr = state.scheduler.state_dict(), state.optimizer.param_groups[0]["lr"]
            rng = rng_states()
            metrics = rlp_step(state, sampler, PhaseTimer())
            assert metrics["skipped"] == 1.0 and state.step == 2
            assert state.scheduler.state_dict() == sched and sched["num_steps"] == 1
            assert state.optimizer.param_groups[0]["lr"] == lr  # warm-up did not advance
            after = rng_states()
            assert after[0] == rng[0] and np.array_equal(after[1], rng[1])
            assert torch.equal(after[2], rng[2])
            assert after[3].keys() == rng[3].keys()
            assert all(torch.equal(after[3][k], rng[3][k]) for k in rng[3])
            rlp_step(state, sampler, PhaseTimer())  # and the next step moves the schedule on
            assert state.scheduler.num_steps == 2
        finally:
            distributed.shutdown()


MOE = ("model.hybrid_layer_pattern=*E", "model.num_experts=4", "model.moe_router_topk=2",
       "model.moe_ffn_hidden_size=64")


@pytest.mark.parametrize("override, shown", [
    ("model.num_experts=8", "num_experts=4 (config: 8)"),
    ("model.moe_router_topk=3", "moe_router_topk=2 (config: 3)"),
])
def test_another_expert_layout_is_refused(tmp_path, override, shown):
    """An MoE checkpoint loaded with another expert count (other tensor shapes) or another
    top-k (the same tensors, another function) is refused in one line naming the checkpoint's
    value, not inside `dist_checkpointing`."""
    root = tmp_path / "ckpt"
    ok("train.steps=1", f"train.save={root}", *MOE)
    moe = [o for o in MOE if not o.startswith(override.split("=")[0] + "=")]
    key, value = shown.split(" ")[0].split("=")
    _refused(root, *moe, override,
             needles=("does not fit the configured model", shown, f"set model.{key}={value}"))
