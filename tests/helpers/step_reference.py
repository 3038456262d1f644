"""One RLP step recomputed from its definitions (/work/shared/RLP.md), for tests.

The step under test records its internals (`MEGATRON_RLP_RECORD`, megatron_rlp/train/
record.py): contexts (document, position t), prefixes, thoughts, S_ema, S_pred, rewards,
advantages, sampling log-probs. This module rebuilds every one of those numbers from:

- the documents and the recorded (document, t) pairs and thought tokens;
- the policy weights theta_{k-1} the step started from, and the teacher weights derived from
  the policy's history by RLP.md's rule (phi_0 = theta_0 at the first step, then
  phi_k = tau * phi_{k-1} + (1 - tau) * theta_k), not read from the step's teacher;
- one Megatron model at TP=1/PP=1, run as a plain full forward over one unpadded sequence at
  a time: no KV cache, no left padding, no document windows, no batching, no output-position
  selection, no vocab-parallel code. The formulas (reward, group advantage, clipped
  surrogate) are written out here again, not imported from megatron_rlp.objective.

Shared by tests/e2e/test_step_reference.py (1 rank, in process) and the layout tests
(TP=2, PP=2 under torchrun, checked here on one rank from their checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

Weights = dict[str, torch.Tensor]


def float_weights(state_dict: dict) -> Weights:
    """The floating-point tensors of a state dict, detached fp32 copies (no `_extra_state`)."""
    return {k: v.detach().clone().float() for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and "_extra_state" not in k}


def teacher_history(thetas: list[Weights], tau: float) -> list[Weights]:
    """phi_j for j = 0..len(thetas)-1: phi_0 = theta_0 (lazy init at step 1), then
    phi_j = tau * phi_{j-1} + (1 - tau) * theta_j (after step j's optimizer step). Step k
    scores S_ema with phi_{k-1}. Computed in float64, returned in fp32."""
    phis = [{k: v.double() for k, v in thetas[0].items()}]
    for theta in thetas[1:]:
        phis.append({k: tau * phis[-1][k] + (1 - tau) * v.double() for k, v in theta.items()})
    return [{k: v.float() for k, v in phi.items()} for phi in phis]


def load_weights(model: torch.nn.Module, weights: Weights) -> None:
    """Copy `weights` into `model`'s tensors of the same names (all of them must exist)."""
    own = model.state_dict()
    missing = [k for k in weights if k not in own]
    assert not missing, f"unknown weights {missing[:3]}"
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)


def full_logits(model: torch.nn.Module, seq: list[int], vocab_size: int) -> torch.Tensor:
    """[len(seq), vocab_size] float64 logits over the real vocabulary (padded ids dropped) at
    every position of one unpadded sequence: row j predicts the token after seq[:j+1]."""
    tokens = torch.tensor([seq], dtype=torch.long)
    positions = torch.arange(len(seq))[None]
    return model(tokens, positions, None)[0, :, :vocab_size].double()


def full_logprobs(model: torch.nn.Module, seq: list[int], vocab_size: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """[len(seq), vocab_size] float64 log softmax(logits / T) over the real vocabulary."""
    return torch.log_softmax(full_logits(model, seq, vocab_size) / temperature, dim=-1)


def expected_prefixes(record: dict, documents, max_prefix: int) -> list[list[int]]:
    """x_<t of each recorded context, by the rule the README states (issue 11): context t must
    see its full prefix, the `max_prefix` tokens before t (fewer at a document's start), and the
    contexts of one document read one shared window, so the window opens `max_prefix` tokens
    before the document's *earliest* position and every context reads from there up to its t.
    Checked here: each prefix holds its full prefix, doc[t - max_prefix : t] or all of doc[:t]."""
    docs, pos = record["doc_index"].tolist(), record["position"].tolist()
    earliest: dict[int, int] = {}
    for d, t in zip(docs, pos, strict=True):
        earliest[d] = min(t, earliest.get(d, t))
    out = []
    for d, t in zip(docs, pos, strict=True):
        doc = [int(x) for x in documents[d]]
        prefix = doc[max(earliest[d] - max_prefix, 0):t]
        full = doc[:t][-max_prefix:]  # the full prefix of RLP.md's context x_<t
        assert prefix[len(prefix) - len(full):] == full and len(prefix) >= min(t, max_prefix)
        out.append(prefix)
    return out


@dataclass
class Reference:
    """What the step should have computed; rows b*G + g as in the record."""

    s_ema: torch.Tensor  # [B] float64
    s_pred: torch.Tensor  # [R]
    logprobs: torch.Tensor  # [R, L] sampling-temperature log-probs of the thought tokens, 0 off
    rewards: torch.Tensor  # [R]
    advantages: torch.Tensor  # [R]
    sequences: list[list[int]]  # prefix <think> thought (</think> appended when forced)


def thought_sequence(prefix: list[int], record: dict, row: int, think_start: int,
                     think_end: int) -> tuple[list[int], int]:
    """(prefix <think> c </think>, number of sampled thought tokens) for one row."""
    n = int(record["thought_mask"][row].sum())
    assert bool(record["thought_mask"][row, :n].all()), "a thought's tokens come first"
    thought = record["thought_tokens"][row, :n].tolist()
    seq = [*prefix, think_start, *thought]
    if not bool(record["closed"][row]):  # force-closed at the limit: </think> is given
        seq.append(think_end)
    return seq, n


@torch.no_grad()
def reference_step(policy: torch.nn.Module, teacher: torch.nn.Module, record: dict, documents,
                   *, max_prefix: int, group_size: int, vocab_size: int, temperature: float,
                   think_start: int, think_end: int) -> Reference:
    """Recompute S_ema, S_pred, rewards, advantages and thought log-probs (RLP.md step 4)
    with `policy` = theta_{k-1} and `teacher` = phi_{k-1} (TP=1/PP=1 models, eval mode)."""
    prefixes = expected_prefixes(record, documents, max_prefix)
    targets = [int(documents[d][t]) for d, t in zip(record["doc_index"].tolist(),
                                                    record["position"].tolist(), strict=True)]
    s_ema = torch.tensor([float(full_logprobs(teacher, p, vocab_size)[-1, x])
                          for p, x in zip(prefixes, targets, strict=True)], dtype=torch.float64)
    rows, width = record["thought_tokens"].shape
    s_pred = torch.zeros(rows, dtype=torch.float64)
    logprobs = torch.zeros(rows, width, dtype=torch.float64)
    sequences = []
    for row in range(rows):
        b = row // group_size
        seq, n = thought_sequence(prefixes[b], record, row, think_start, think_end)
        sequences.append(seq)
        logits = full_logits(policy, seq, vocab_size)
        s_pred[row] = torch.log_softmax(logits[-1], -1)[targets[b]]
        lp = torch.log_softmax(logits / temperature, -1)
        first = len(prefixes[b])  # logits after `<think>` predict thought token 0
        for u in range(n):
            logprobs[row, u] = lp[first + u, seq[first + 1 + u]]
    # r = S_pred - S_ema of the thought's own context: row b*G + g belongs to context b
    rewards = torch.stack([s_pred[row] - s_ema[row // group_size] for row in range(rows)])
    r = rewards.view(-1, group_size)
    advantages = (group_size / (group_size - 1) * (r - r.mean(1, keepdim=True))).view(-1)
    return Reference(s_ema, s_pred, logprobs, rewards, advantages, sequences)


def reference_gradient(policy: torch.nn.Module, ref: Reference, record: dict, *,
                       group_size: int, vocab_size: int, temperature: float,
                       eps_low: float, eps_high: float, num_thoughts: int
                       ) -> tuple[float, dict[str, torch.Tensor]]:
    """Autograd gradient of the clipped surrogate (RLP.md) over this record's thoughts, with
    pi_old = the policy itself (one update per rollout batch: rho = 1, gradient of log pi).

    The loss is divided by `num_thoughts` (all B*G thoughts of the global batch), so summing
    the gradients of every data-parallel rank's record gives the step's gradient.
    Returns (loss, {parameter name: fp32 gradient}).
    """
    policy.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for row, seq in enumerate(ref.sequences):
        n = int(record["thought_mask"][row].sum())
        first = len(seq) - n - 1 - (0 if bool(record["closed"][row]) else 1)
        lp_all = full_logprobs(policy, seq, vocab_size, temperature)
        lp = torch.stack([lp_all[first + u, seq[first + 1 + u]] for u in range(n)])
        rho = torch.exp(lp - lp.detach())
        a = ref.advantages[row]
        per_token = torch.minimum(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)
        total = total - per_token.mean() / num_thoughts
    total.backward()
    grads = {k: (p.grad.float().clone() if p.grad is not None else torch.zeros_like(p))
             for k, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    return float(total.detach()), grads


def assert_step_matches(record: dict, ref: Reference, atol: float = 1e-4) -> dict[str, float]:
    """The recorded step equals the reference within fp32 tolerance (log-probs are O(1-10);
    a full forward and a cached decode differ by reduction order only: ~1e-6). Returns the
    max errors by quantity."""
    mask = record["thought_mask"]
    errors = {}
    checks = {
        "s_ema": (record["s_ema"], ref.s_ema),
        "s_pred": (record["s_pred"], ref.s_pred),
        "rewards": (record["rewards"], ref.rewards),
        "advantages": (record["advantages"], ref.advantages),
        "thought log-probs": (torch.where(mask, record["thought_logprobs"], 0.0), ref.logprobs),
    }
    for name, (got, want) in checks.items():
        err = (got.double() - want).abs().max().item()
        assert err <= atol, f"step {record['step']} {name}: max |step - reference| {err:.2e}"
        errors[name] = err
    return errors


# ---------------------------------------------------------------------------------------
# Runs under torchrun (the layout tests): merge the ranks' records, check against the
# reference on one rank from the run's per-step checkpoints.


def merged_records(record_dir: Path) -> dict[int, dict]:
    """{step: the global record}: tensor/pipeline rank 0 of every data-parallel rank, rows
    concatenated in data-parallel order (= global context order)."""
    by_step: dict[int, list[dict]] = {}
    for path in sorted(record_dir.glob("step_*_rank*.pt")):
        rec = torch.load(path)
        if rec["tp_rank"] == 0 and rec["pp_rank"] == 0:
            by_step.setdefault(rec["step"], []).append(rec)
    merged = {}
    for step, recs in by_step.items():
        recs.sort(key=lambda r: r["dp_rank"])
        out = {"step": step}
        for key, value in recs[0].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[key] = torch.cat([r[key] for r in recs])
            elif isinstance(value, list):
                out[key] = [x for r in recs for x in r[key]]
        merged[step] = out
    return merged


def assert_records_match(ref: dict[int, dict], got: dict[int, dict], atol: float) -> None:
    """Two runs' steps hold the same contexts and thoughts (exactly) and the same per-thought
    log-probs, S_ema, S_pred, rewards and advantages (within `atol`)."""
    assert sorted(got) == sorted(ref)
    for step, a in ref.items():
        b = got[step]
        for key in ("context_ids", "doc_index", "position", "target", "thought_tokens",
                    "thought_mask", "closed"):
            assert torch.equal(a[key], b[key]), f"step {step}: {key} differ"
        for key in ("thought_logprobs", "s_ema", "s_pred", "rewards", "advantages"):
            err = (a[key].double() - b[key].double()).abs().max().item()
            assert err <= atol, f"step {step} {key}: max |diff| {err:.2e} (> {atol:.0e})"


def check_run_against_reference(config: str, overrides: tuple[str, ...], ckpt_root: Path,
                                record_dir: Path, rows: list[dict], atol: float = 1e-5) -> None:
    """A run's recorded steps (any layout; checkpoints saved after every step) against the
    reference computed here on one rank: theta_0 is a fresh model (initial weights do not
    depend on the layout), theta_k is read from the step-k checkpoint by the project's loader
    into TP=1/PP=1 (as an NTP warm start: policy weights only). Also the step's reported
    grad_norm against the reference gradient's norm. Collective-free; initialises and shuts
    down a one-process group in this process.

    Args:
        overrides: the run's model/rlp overrides *without* the parallel layout.
        rows: the run's metrics rows (grad_norm per step).
    """
    from megatron_rlp import distributed
    from megatron_rlp.checkpoint import load_checkpoint
    from megatron_rlp.config import load_config
    from megatron_rlp.models.provider import build_model, unwrap_model
    from megatron_rlp.train.builder import build_state

    records = merged_records(record_dir)
    steps = sorted(records)
    cfg = load_config(config, (*overrides, "train.objective=ntp", "data.ntp_seq_length=16"),
                      world_size=1)
    distributed.initialize(cfg)
    try:
        state = build_state(cfg)
        thetas = [float_weights(unwrap_model(state.policy).state_dict())]
        for k in steps[:-1]:
            load_checkpoint(state, str(ckpt_root / f"step_{k:08d}"), checksums=False)
            thetas.append(float_weights(unwrap_model(state.policy).state_dict()))
        tok, r = state.tokenizer, cfg.rlp
        phis = teacher_history(thetas, r.ema_decay)
        policy, teacher = (build_model(cfg, tok.vocab_size).eval() for _ in range(2))
        for k in steps:
            load_weights(policy, thetas[k - 1])
            load_weights(teacher, phis[k - 1])
            ref = reference_step(policy, teacher, records[k], state.corpus.documents,
                                 max_prefix=r.max_prefix_tokens, group_size=r.group_size,
                                 vocab_size=tok.vocab_size, temperature=r.temperature,
                                 think_start=tok.think_start, think_end=tok.think_end)
            assert_step_matches(records[k], ref, atol)
            if k > 1:  # the teacher is not the policy: S_ema can tell them apart
                load_weights(teacher, thetas[k - 1])
                as_policy = reference_step(
                    policy, teacher, records[k], state.corpus.documents,
                    max_prefix=r.max_prefix_tokens, group_size=r.group_size,
                    vocab_size=tok.vocab_size, temperature=r.temperature,
                    think_start=tok.think_start, think_end=tok.think_end)
                gap = (as_policy.s_ema - ref.s_ema).abs().max().item()
                assert gap > 10 * atol, f"step {k}: teacher and policy S_ema differ by {gap:.1e}"
            _, grads = reference_gradient(
                policy, ref, records[k], group_size=r.group_size, vocab_size=tok.vocab_size,
                temperature=r.temperature, eps_low=r.clip_eps_low, eps_high=r.clip_eps_high,
                num_thoughts=len(ref.sequences))
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
            got = next(row["grad_norm"] for row in rows if row["step"] == k)
            assert abs(got - norm) <= 1e-4 * norm, f"step {k} grad_norm {got} vs reference {norm}"
    finally:
        distributed.shutdown()
