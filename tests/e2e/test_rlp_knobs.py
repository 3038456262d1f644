"""The issue-12 knobs in a real RLP step (one rank, gloo, CPU, tiny dense model):

- `rlp.ntp_loss_coef`: the step's gradient is the RLP gradient + coef x the plain NTP
  gradient of the raw windows; the NTP loss is the hand-computed cross-entropy; at 0 the NTP
  pass never runs.
- `rlp.kl_coef`: the step's gradient is the RLP gradient + beta x the gradient of the k3 KL
  to the frozen reference, computed by hand on the unpacked rows (the step uses the packed
  update); at 0 the reference is never run; the reference is checkpointed, and a checkpoint
  without one is refused for a KL run.
- `rlp.thought_template=paper`: the teacher's S_ema is that of the raw prefix.
- `train.eval_position_strategy`: held-out contexts at the chosen positions.

The optimizer step is replaced by a recorder of the reduced gradients (no parameter moves),
so every run of step 1 samples the same contexts and thoughts.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_rlp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megatron_rlp.data.batches import build_rlp_inputs, update_batch
from megatron_rlp.data.corpus import load_corpus
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.objective.kl import kl_penalty
from megatron_rlp.rollout.template import PAPER_INSTRUCTION
from megatron_rlp.rollout.vocab_parallel import token_logprobs_vocab_parallel
from megatron_rlp.train import rlp_step as rlp_step_module
from megatron_rlp.train.ntp_mix import ntp_pass
from megatron_rlp.train.rlp_step import local_contexts, rlp_step
from megatron_rlp.train.samplers import make_context_sampler
from megatron_rlp.train.timers import PhaseTimer
from megatron_rlp.train.update import _forward_backward, _zero_grads
from megatron_rlp.train.validate import eval_sampler, validate

TINY = (
    "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=192",
    "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=4",
    "rlp.positions_per_document=2", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32",
    "rlp.kl_coef=0.5", "optimizer.lr=1e-2", "train.seed=7", "data.split=90,10,0",
    "train.eval_contexts=4",
)

# `state`: tests/conftest.py's fixture (tiny_cpu.yaml + TINY)


@pytest.fixture
def step1(state, monkeypatch):
    """Run step 1 with the given knobs; return (metrics, reduced gradients, trace)."""
    grads: dict[str, torch.Tensor] = {}

    def record():
        grads.update({n: p.main_grad.clone() for n, p in state.policy.named_parameters()})
        return False, None, None  # not applied: nothing moves, the next run redoes step 1

    monkeypatch.setattr(state.optimizer, "step", record)
    saved = (state.cfg.rlp.kl_coef, state.cfg.rlp.ntp_loss_coef, state.cfg.rlp.thought_template)

    def run(kl=0.0, ntp=0.0, template="none"):
        r = state.cfg.rlp
        r.kl_coef, r.ntp_loss_coef, r.thought_template = kl, ntp, template
        state.step, trace = 0, {}
        metrics = rlp_step(state, make_context_sampler(state), PhaseTimer(), trace)
        return metrics, dict(grads), trace

    yield run
    r = state.cfg.rlp
    r.kl_coef, r.ntp_loss_coef, r.thought_template = saved


def _assert_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    assert any(bool(w.abs().max() > 0) for w in want.values())
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= 1e-4 * w.abs().max().item() + 1e-9, f"{name}: max |diff| {err:.2e}"


def _raw_windows(state):
    r, tok = state.cfg.rlp, state.tokenizer
    contexts, ids = local_contexts(state, make_context_sampler(state), 1)
    return build_rlp_inputs(contexts, ids, state.corpus, r.max_prefix_tokens, tok.pad)[1]


def test_ntp_mix_adds_coef_times_the_plain_ntp_gradient(state, step1, monkeypatch):
    base, g_rlp, _ = step1()
    assert "ntp_loss" not in base and "kl_ref" not in base
    coef = 0.5
    mixed, g_mix, _ = step1(ntp=coef)
    assert mixed["loss"] == pytest.approx(base["loss"], rel=1e-6)  # the RLP loss, reported alone

    # The plain NTP gradient of the same raw windows, alone.
    windows = _raw_windows(state)
    _zero_grads(state)
    sink = []
    mbs, fwd, width = ntp_pass(windows, 1.0, 1, sink)
    _forward_backward(state, mbs, fwd, width)
    g_ntp = {n: p.main_grad.clone() for n, p in state.policy.named_parameters()}
    _zero_grads(state)
    _assert_close(g_mix, {n: g_rlp[n] + coef * g_ntp[n] for n in g_rlp})

    # The NTP loss is the token-mean next-token cross-entropy of the windows, by hand.
    with torch.no_grad():
        b = mbs[0]
        logits = state.policy(b["tokens"], b["positions"], padded_causal_mask(b["valid"]))
        nll = -F.log_softmax(logits.float(), -1).gather(-1, b["labels"][..., None])[..., 0]
        want = float(nll[b["loss_mask"]].mean())
    assert mixed["ntp_loss"] == pytest.approx(want, rel=1e-5)
    assert float(sink[0]) == pytest.approx(want, rel=1e-5)

    # Off (the default) the NTP pass is never built.
    monkeypatch.setattr(rlp_step_module, "ntp_pass", lambda *a: pytest.fail("ntp pass ran"))
    again, g_again, _ = step1()
    assert again["loss"] == base["loss"]
    for n in g_rlp:
        assert torch.equal(g_again[n], g_rlp[n])


def test_kl_penalty_adds_beta_times_the_k3_gradient(state, step1, monkeypatch):
    assert state.reference is not None  # built because the config has kl_coef > 0
    base, g_rlp, trace = step1()
    # The reference was copied from the policy at the first step; move it so KL > 0.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in state.reference.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    beta = 0.5
    try:
        with_kl, g_kl, trace_kl = step1(kl=beta)
        assert torch.equal(trace_kl["thoughts"].tokens, trace["thoughts"].tokens)

        # By hand, on the unpacked rows: logits at every position, then the thought positions.
        tok, r = state.tokenizer, state.cfg.rlp
        batch = update_batch(trace["prompts"], trace["thoughts"], trace["advantages"],
                             r.group_size, tok.pad, tok.think_start)

        def thought_logprobs(model):
            logits = model(batch["tokens"], batch["positions"], None)
            index = batch["index"][..., None].expand(-1, -1, logits.shape[-1])
            return token_logprobs_vocab_parallel(logits.gather(1, index), batch["labels"],
                                                 tok.vocab_size, r.temperature)

        with torch.no_grad():
            logp_ref = thought_logprobs(state.reference.model)
        kl = kl_penalty(thought_logprobs(state.policy), logp_ref, batch["mask"])
        names = [n for n, _ in state.policy.named_parameters()]
        grads = torch.autograd.grad(kl, [p for _, p in state.policy.named_parameters()])
        assert with_kl["kl_ref"] == pytest.approx(float(kl.detach()), rel=1e-4)
        assert float(kl.detach()) > 1e-4
        _assert_close(g_kl, {n: g_rlp[n] + beta * g for n, g in zip(names, grads, strict=True)})

        # Off, the reference is never run.
        monkeypatch.setattr(rlp_step_module, "reference_logprobs",
                            lambda *a: pytest.fail("reference ran"))
        assert "kl_ref" not in step1()[0]
    finally:
        state.reference.initialize_from(state.policy)


def test_reference_is_checkpointed_and_required_for_kl_resume(state, step1, tmp_path):
    step1(kl=0.5)  # teacher and reference initialised
    ref = {n: p.clone() for n, p in state.reference.model.named_parameters()}
    ckpt = save_checkpoint(state, str(tmp_path / "with"))
    with torch.no_grad():
        for p in state.reference.model.parameters():
            p.zero_()
    state.reference.initialized = False
    load_checkpoint(state, str(ckpt))
    assert state.reference.initialized
    for n, p in state.reference.model.named_parameters():
        assert torch.equal(p, ref[n]), n

    reference, state.reference = state.reference, None  # a run with kl_coef = 0 saves none
    try:
        plain = save_checkpoint(state, str(tmp_path / "without"))
    finally:
        state.reference = reference
    with pytest.raises(CheckpointError, match="no KL reference policy.*rlp.kl_coef=0"):
        load_checkpoint(state, str(plain))


def test_paper_template_keeps_the_teacher_on_raw_prefixes(state, step1):
    raw, _, trace_raw = step1()
    paper, _, trace = step1(template="paper")
    instruction = state.tokenizer.encode(PAPER_INSTRUCTION)
    p = trace["prompts"]
    for b in range(len(p.lengths)):
        got = p.tokens[b, -int(p.lengths[b]):].tolist()
        want = trace_raw["prompts"].tokens[b, -int(trace_raw["prompts"].lengths[b]):].tolist()
        assert got == instruction + want
    assert paper["s_ema"] == raw["s_ema"]  # the teacher read the same raw windows
    assert paper["s_pred"] != raw["s_pred"]  # the policy did not


@pytest.mark.parametrize("strategy", ["uniform", "stride", "entropy"])
def test_eval_position_strategy(state, strategy, monkeypatch):
    monkeypatch.setattr(state.cfg.train, "eval_position_strategy", strategy)
    sampler = eval_sampler(state)
    assert sampler.strategy == strategy
    metrics = validate(state, sampler)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    if strategy == "entropy":  # the positions are the valid split's highest-entropy ones
        uniform = eval_sampler(state)
        uniform.strategy = "uniform"
        assert [c.position for c in sampler.sample(0, 4, 1)] != [
            c.position for c in uniform.sample(0, 4, 1)]


def test_all_knobs_per_context_path_equals_shared_prefix_path(state, step1, monkeypatch):
    """Template with forced tokens, KL and NTP on: the per-context rollout and unpacked update
    (`rlp.share_prefixes=false`) give the shared-prefix / packed step's loss and gradient."""
    knobs = dict(kl=0.5, ntp=0.5, template="Text: {context}\nThink:")
    gen = torch.Generator().manual_seed(1)
    try:
        step1()  # initialise the reference, then move it so the KL term is not zero
        with torch.no_grad():
            for p in state.reference.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        shared, g_shared, t_shared = step1(**knobs)
        monkeypatch.setattr(state.cfg.rlp, "share_prefixes", False)
        plain, g_plain, t_plain = step1(**knobs)
    finally:
        state.reference.initialize_from(state.policy)
    assert torch.equal(t_plain["thoughts"].tokens, t_shared["thoughts"].tokens)
    for key in ("loss", "kl_ref", "ntp_loss", "s_pred", "s_ema"):
        assert plain[key] == pytest.approx(shared[key], rel=1e-4, abs=1e-6), key
    assert shared["kl_ref"] > 1e-4
    _assert_close(g_plain, g_shared)


def test_eval_at_answer_positions(state, monkeypatch, tmp_path):
    """`answer`: held-out contexts at a task corpus's answers; refused (ValueError, which the
    loop reports as a one-line data error) on a corpus without answer offsets."""
    with pytest.raises(ValueError, match="no answer positions"):
        monkeypatch.setattr(state.cfg.train, "eval_position_strategy", "answer")
        eval_sampler(state)
    lines = []
    for i in range(5):  # answers 40 ... 48
        text = f"Question: What is {10 + i} + {30 + i}?\nAnswer: "
        lines.append(json.dumps({"text": text + str(40 + 2 * i), "answer_offsets": [len(text)]}))
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines))
    monkeypatch.setattr(state, "valid_corpus",
                        load_corpus(tmp_path / "tasks.jsonl", state.tokenizer))
    sampler = eval_sampler(state)
    assert sampler.strategy == "answer"
    assert all(chr(c.target) == "4" for c in sampler.sample(0, 4))  # the answers' first digit
    metrics = validate(state, sampler)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
