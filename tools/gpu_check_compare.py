"""The decisions of tools/gpu_check.py: a stage's numbers against the shipped CPU fp32
reference or against its tolerances, as a list of one-line failures (empty = pass).

Pure functions on the JSON the stages write (tools/gpu_check_step.py, bench_packed_attention),
so the tests plant wrong numbers in them directly.

fp32 against the CPU fp32 reference (docs/gpu/reference/*.json), step 1, row by row:

- contexts (ids, documents, positions), thought tokens, their mask, the closed flags: exact;
- S_ema [B], S_pred [R], thought log-probs [R, L], rewards, advantages: abs <= 1e-3;
- the step-1 loss: abs <= 1e-5 (the surrogate of zero-mean advantages is ~1e-7);
- the grad norm: rel <= 1e-3;
- the parameters after the update, per tensor: norm rel <= 1e-5; mean |update| / lr within
  1e-2; of 256 sampled updates (in lr units), at most 2% off by more than 0.5 lr.

Why these hold across machines: the initial weights are drawn on the CPU by layer-keyed
seeds (models/seeded_init.py) and thoughts by a counter-based sampler whose noise is pure
int64 arithmetic (rollout/sampling.py), so the GPU run starts from the reference's weights
and draws the reference's noise under any torch version; what differs is fp32 rounding
(reduction order, kernels, torch 2.11 on the GPU against 2.14 here), ~1e-6 on a log-prob.
TF32 is switched off for the fp32 run. A thought token can differ only where two tokens'
noisy scores tie within that rounding (none was seen between CPU runs; a mismatch fails).

bf16: every step applied (no skipped update), every metric finite. Flex against the mask
path of one packed update: loss rel <= 2e-2 (bf16) / 1e-5 (fp32), largest gradient
difference <= 5e-2 (bf16) / 1e-4 (fp32) of the largest gradient entry.
"""

from __future__ import annotations

import math

TOL = {"row": 1e-3, "loss": 1e-5, "grad_norm_rel": 1e-3, "param_norm_rel": 1e-5,
       "update_l1": 1e-2, "update_sample": 0.5, "update_sample_fraction": 0.02}
FLEX_TOL = {"bf16": {"loss_rel": 2e-2, "grad_rel": 5e-2},
            "fp32": {"loss_rel": 1e-5, "grad_rel": 1e-4}}
EXACT = ("context_ids", "doc_index", "position", "thought_tokens", "thought_mask", "closed")
ROWS = ("s_ema", "s_pred", "logprobs", "rewards", "advantages")


def _flat(x, index=()):
    """(index tuple, value) of a nested list."""
    if isinstance(x, list):
        for i, v in enumerate(x):
            yield from _flat(v, (*index, i))
    else:
        yield index, x


def _where(index: tuple) -> str:
    if len(index) == 1:
        return f"row {index[0]}"
    return f"row {index[0]} token {index[1]}" if len(index) == 2 else str(index)


def compare_record(name: str, got: dict, ref: dict, tol: dict = TOL) -> list[str]:
    """Step 1 of a device run (`record`, `steps`, `params` of gpu_check_step.py's JSON)
    against the CPU fp32 reference: every mismatch, one line each (at most 3 per quantity)."""
    fails: list[str] = []
    if ref.get("config") != got.get("config") or _shape(ref) != _shape(got):
        return [f"{name}: ran {got.get('config')} {_shape(got)}, the reference is "
                f"{ref.get('config')} {_shape(ref)}"]
    g, r = got["record"], ref["record"]
    for key in EXACT:
        a, b = dict(_flat(g[key])), dict(_flat(r[key]))
        if a.keys() != b.keys():
            fails.append(f"{name}: {key} shape differs from the reference")
            continue
        bad = [i for i in b if a[i] != b[i]]
        fails += [f"{name}: {key} {_where(i)}: device {a[i]} != reference {b[i]}"
                  for i in bad[:3]]
    for key in ROWS:
        a, b = dict(_flat(g[key])), dict(_flat(r[key]))
        if a.keys() != b.keys():
            fails.append(f"{name}: {key} shape differs from the reference")
            continue
        bad = [i for i in b if not abs(a[i] - b[i]) <= tol["row"]]
        fails += [f"{name}: {key} {_where(i)}: device {a[i]:.6f} vs reference {b[i]:.6f} "
                  f"(|diff| {abs(a[i] - b[i]):.1e} > {tol['row']:.0e})" for i in bad[:3]]
    s_got, s_ref = got["steps"][0], ref["steps"][0]
    if not abs(s_got["loss"] - s_ref["loss"]) <= tol["loss"]:
        fails.append(f"{name}: step-1 loss device {s_got['loss']:.3e} vs reference "
                     f"{s_ref['loss']:.3e} (> {tol['loss']:.0e})")
    if not _rel(s_got["grad_norm"], s_ref["grad_norm"]) <= tol["grad_norm_rel"]:
        fails.append(f"{name}: step-1 grad norm device {s_got['grad_norm']:.6f} vs reference "
                     f"{s_ref['grad_norm']:.6f} (rel > {tol['grad_norm_rel']:.0e})")
    fails += compare_params(name, got["params"], ref["params"], tol)
    return fails


def _shape(run: dict) -> list[str]:
    """The run's overrides without device and dtype (what must match the reference)."""
    return [o for o in run.get("overrides", [])
            if not o.startswith(("device.type=", "precision.params_dtype="))]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare_params(name: str, got: dict, ref: dict, tol: dict = TOL) -> list[str]:
    """The parameter fingerprints after one update (gpu_check_step.param_fingerprint)."""
    if got.keys() != ref.keys():
        return [f"{name}: parameter names differ from the reference "
                f"({sorted(set(got) ^ set(ref))[:3]})"]
    fails = []
    for key, r in ref.items():
        g = got[key]
        if not _rel(g["norm"], r["norm"]) <= tol["param_norm_rel"]:
            fails.append(f"{name}: {key} norm after the update {g['norm']:.6f} vs reference "
                         f"{r['norm']:.6f}")
        if not abs(g["update_l1"] - r["update_l1"]) <= tol["update_l1"]:
            fails.append(f"{name}: {key} mean |update|/lr {g['update_l1']:.4f} vs reference "
                         f"{r['update_l1']:.4f}")
        off = sum(not abs(a - b) <= tol["update_sample"]
                  for a, b in zip(g["sample"], r["sample"], strict=True))
        if off > tol["update_sample_fraction"] * len(r["sample"]):
            fails.append(f"{name}: {key} {off} of {len(r['sample'])} sampled updates differ "
                         f"by > {tol['update_sample']} lr from the reference")
    return fails


def check_steps(name: str, steps: list[dict], expected: int) -> list[str]:
    """bf16 (or any) run: `expected` steps ran, none skipped, every metric finite."""
    fails = []
    if len(steps) != expected:
        fails.append(f"{name}: {len(steps)} of {expected} steps ran")
    for s in steps:
        if s.get("skipped"):
            fails.append(f"{name}: step {s['step']} skipped its update (non-finite loss or "
                         "gradient)")
        bad = sorted(k for k, v in s.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            fails.append(f"{name}: step {s['step']} non-finite {', '.join(bad)}")
    return fails


def check_flex_vs_mask(bench: dict, dtype: str) -> list[str]:
    """One packed update, flex against the explicit mask (tools/bench_packed_attention.py)."""
    tol = FLEX_TOL[dtype]
    fails = []
    loss = bench["loss"]["mask"]
    values = [bench["loss_abs_diff"], bench["grad_max_abs_diff"], loss, bench["loss"]["flex"]]
    if not all(math.isfinite(v) for v in values):
        return [f"packed_attention: non-finite loss or gradient difference ({values})"]
    if not bench["loss_abs_diff"] <= tol["loss_rel"] * max(abs(loss), 1e-6):
        fails.append(f"packed_attention: flex loss {bench['loss']['flex']:.6e} vs mask "
                     f"{loss:.6e} (rel > {tol['loss_rel']:.0e}, {dtype})")
    scale = bench["grad_max_abs"]
    if not bench["grad_max_abs_diff"] <= tol["grad_rel"] * scale:
        fails.append(f"packed_attention: flex-vs-mask gradient max |diff| "
                     f"{bench['grad_max_abs_diff']:.2e} > {tol['grad_rel']:.0e} x max |grad| "
                     f"{scale:.2e} ({dtype})")
    return fails
