"""The pure-torch Mamba-2 kernels (megatron_rlp/models/mamba/ops.py) against references
written independently here: a position-by-position recurrence in float64, a direct causal
convolution, a plain gated RMSNorm; and against transformers' torch fallbacks
(`mamba2_chunk_scan`, `causal_conv1d_fn`, `causal_conv1d_update`) when transformers imports.

The recurrence, per head h and position t (dt after bias and softplus):
    state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_t^T ;  y_t = state_t C_t + D_h x_t
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_rlp.models.mamba import ops

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=dtype)


def ssm_inputs(b=2, length=23, h=4, p=3, g=2, n=5, seed=0, dtype=F64):
    r = gen(seed)
    return dict(
        x=randn(b, length, h, p, g=r, dtype=dtype), dt=randn(b, length, h, g=r, dtype=dtype),
        A=-torch.rand(h, generator=r, dtype=dtype) * 4 - 0.1,
        B=randn(b, length, g, n, g=r, dtype=dtype), C=randn(b, length, g, n, g=r, dtype=dtype),
        D=randn(h, g=r, dtype=dtype), z=randn(b, length, h, p, g=r, dtype=dtype),
        dt_bias=randn(h, g=r, dtype=dtype), init=randn(b, h, p, n, g=r, dtype=dtype),
    )


def recurrence(x, dt, A, B, C, D=None, z=None, dt_bias=None, init=None, softplus=True):
    """Sequential reference: one position, one head at a time (float64, no vectorisation
    over time or heads; out of place, so autograd can differentiate it)."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dt = dt + dt_bias if dt_bias is not None else dt
    dt = F.softplus(dt) if softplus else dt
    states = [torch.zeros(b, p, n, dtype=F64) if init is None else init[:, head].to(F64)
              for head in range(h)]
    ys = []
    for t in range(length):
        y_t = []
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])  # [b]
            inp = dt[:, t, head, None, None] * x[:, t, head, :, None] * B[:, t, grp, None, :]
            states[head] = decay[:, None, None] * states[head] + inp
            y = (states[head] * C[:, t, grp, None, :]).sum(-1)
            if D is not None:
                y = y + D[head] * x[:, t, head]
            if z is not None:
                y = y * z[:, t, head] * torch.sigmoid(z[:, t, head])
            y_t.append(y)
        ys.append(torch.stack(y_t, 1))
    return torch.stack(ys, 1), torch.stack(states, 1)


def direct_conv(x, weight, bias=None, init=None, silu=False):
    """out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (w - 1) + k] (zeros / `init`
    before position 0)."""
    b, d, length = x.shape
    w = weight.shape[1]
    hist = torch.zeros(b, d, w - 1, dtype=x.dtype) if init is None else init
    xp = torch.cat([hist, x], -1)
    out = torch.zeros(b, d, length, dtype=x.dtype)
    for t in range(length):
        for k in range(w):
            out[:, :, t] += weight[:, k] * xp[:, :, t + k]
    if bias is not None:
        out = out + bias[:, None]
    return out * torch.sigmoid(out) if silu else out


# --------------------------------------------------------------------------------------
# SSD chunked scan


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunk_scan_equals_recurrence(chunk, with_init):
    a = ssm_inputs()
    init = a["init"] if with_init else None
    y, final = ops.mamba_chunk_scan_combined(
        a["x"], a["dt"], a["A"], a["B"], a["C"], chunk, D=a["D"], z=a["z"],
        dt_bias=a["dt_bias"], initial_states=init, dt_softplus=True, return_final_states=True)
    want_y, want_state = recurrence(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                    a["dt_bias"], init)
    assert y.dtype == F64 and final.dtype == F64
    torch.testing.assert_close(y, want_y, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(final, want_state, atol=1e-11, rtol=1e-11)


def test_chunk_scan_options_and_dtypes():
    a = ssm_inputs(b=1, length=10, h=2, p=2, g=1, n=3, seed=1)
    # D per (head, channel); no softplus, no bias; dt_limit clamps after softplus
    D2 = randn(2, 2, g=gen(5))
    dt = a["dt"].abs()
    y = ops.mamba_chunk_scan_combined(a["x"], dt, a["A"], a["B"], a["C"], 4, D=D2)
    want, _ = recurrence(a["x"], dt, a["A"], a["B"], a["C"], softplus=False)
    torch.testing.assert_close(y, want + a["x"] * D2, atol=1e-11, rtol=1e-11)
    y = ops.mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], 4,
                                      dt_softplus=True, dt_limit=(0.2, 0.5))
    want, _ = recurrence(a["x"], F.softplus(a["dt"]).clamp(0.2, 0.5), a["A"], a["B"], a["C"],
                         softplus=False)
    torch.testing.assert_close(y, want, atol=1e-11, rtol=1e-11)
    # fp32 and bf16 inputs: fp32 arithmetic, outputs in the input dtype, state fp32
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        b = {k: v.to(dtype) for k, v in a.items()}
        y, s = ops.mamba_chunk_scan_combined(b["x"], b["dt"], b["A"], b["B"], b["C"], 4,
                                             D=b["D"], dt_softplus=True,
                                             return_final_states=True)
        assert y.dtype == dtype and s.dtype == torch.float32
        want, want_s = recurrence(*(b[k].to(F64) for k in ("x", "dt", "A", "B", "C", "D")))
        torch.testing.assert_close(y.to(F64), want, atol=tol, rtol=tol)
        torch.testing.assert_close(s.to(F64), want_s, atol=tol, rtol=tol)


def test_chunk_scan_gradients_match_recurrence():
    a = ssm_inputs(b=1, length=9, h=2, p=2, g=1, n=3, seed=2)
    keys = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    leaves = {k: a[k].clone().requires_grad_() for k in keys}
    y = ops.mamba_chunk_scan_combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"],
                                      leaves["C"], 4, D=leaves["D"], z=leaves["z"],
                                      dt_bias=leaves["dt_bias"], dt_softplus=True)
    weights = randn(*y.shape, g=gen(9))
    got = torch.autograd.grad((y * weights).sum(), [leaves[k] for k in keys])
    ref_leaves = {k: a[k].clone().requires_grad_() for k in keys}
    want_y, _ = recurrence(*(ref_leaves[k] for k in keys))
    want = torch.autograd.grad((want_y * weights).sum(), [ref_leaves[k] for k in keys])
    for k, gk, wk in zip(keys, got, want, strict=True):
        torch.testing.assert_close(gk, wk, atol=1e-10, rtol=1e-10, msg=k)


@pytest.mark.parametrize("chunk", [4, 8, 64])
def test_states_at_positions_equal_recurrence(chunk):
    """`ssd_states_at`: the state after any prefix (0, chunk edges, inside chunks, the whole
    sequence), from zero and from given initial states, is the recurrence's."""
    a = ssm_inputs(length=24, seed=5)
    rows = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    ends = torch.tensor([0, 0, 8, 16, 13, 24, 1])
    for init in (None, a["init"]):
        want = torch.stack([recurrence(a["x"][:, :e], a["dt"][:, :e], a["A"], a["B"][:, :e],
                                       a["C"][:, :e], dt_bias=a["dt_bias"], init=init)[1]
                            if e else (torch.zeros_like(a["init"]) if init is None else init)
                            for e in range(25)], 1)  # [b, l + 1, h, p, n]
        got = ops.ssd_states_at(a["x"], a["dt"], a["A"], a["B"], rows, ends, chunk,
                                dt_bias=a["dt_bias"], dt_softplus=True, initial_states=init)
        torch.testing.assert_close(got, want[rows, ends], atol=1e-12, rtol=1e-12)


def test_states_at_gradients_match_recurrence():
    a = ssm_inputs(b=2, length=11, h=2, p=2, g=1, n=3, seed=6)
    keys = ("x", "dt", "A", "B", "dt_bias", "init")
    rows, ends = torch.tensor([0, 1, 1]), torch.tensor([4, 7, 11])
    leaves = {k: a[k].clone().requires_grad_() for k in keys}
    got_s = ops.ssd_states_at(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], rows, ends,
                              4, dt_bias=leaves["dt_bias"], dt_softplus=True,
                              initial_states=leaves["init"])
    weights = randn(*got_s.shape, g=gen(10))
    got = torch.autograd.grad((got_s * weights).sum(), [leaves[k] for k in keys])
    ref = {k: a[k].clone().requires_grad_() for k in keys}
    want_s = torch.stack([recurrence(ref["x"][r:r + 1, :e], ref["dt"][r:r + 1, :e], ref["A"],
                                     ref["B"][r:r + 1, :e], ref["B"][r:r + 1, :e],
                                     dt_bias=ref["dt_bias"], init=ref["init"][r:r + 1])[1][0]
                          for r, e in zip(rows.tolist(), ends.tolist(), strict=True)])
    want = torch.autograd.grad((want_s * weights).sum(), [ref[k] for k in keys])
    for k, gk, wk in zip(keys, got, want, strict=True):
        torch.testing.assert_close(gk, wk, atol=1e-10, rtol=1e-10, msg=k)


# --------------------------------------------------------------------------------------
# Convolution, state updates, norm


def test_causal_conv1d_fn_and_final_states():
    r = gen(3)
    x, w, bias, init = randn(2, 5, 9, g=r), randn(5, 4, g=r), randn(5, g=r), randn(2, 5, 3, g=r)
    torch.testing.assert_close(ops.causal_conv1d_fn(x, w, bias, activation="silu"),
                               direct_conv(x, w, bias, silu=True), atol=1e-12, rtol=1e-12)
    out, final = ops.causal_conv1d_fn(x, w, None, initial_states=init, return_final_states=True)
    torch.testing.assert_close(out, direct_conv(x, w, init=init), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(final, x[..., -3:])
    _, final = ops.causal_conv1d_fn(x[..., :2], w, None, initial_states=init,
                                    return_final_states=True)
    torch.testing.assert_close(final, torch.cat([init[..., -1:], x[..., :2]], -1))


@pytest.mark.parametrize("state_len", [3, 4])
def test_causal_conv1d_update_steps_equal_full_conv(state_len):
    r = gen(4)
    x, w, bias = randn(3, 6, 8, g=r), randn(6, 4, g=r), randn(6, g=r)
    full = direct_conv(x, w, bias, silu=True)
    state = torch.zeros(3, 6, state_len, dtype=F64)
    for t in range(8):  # [batch, dim] one position at a time
        out = ops.causal_conv1d_update(x[:, :, t], state, w, bias, "silu")
        torch.testing.assert_close(out, full[:, :, t], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, x[..., -state_len:])
    state = torch.zeros(3, 6, state_len, dtype=F64)  # [batch, dim, seqlen] chunks
    outs = [ops.causal_conv1d_update(x[..., s:s + 3], state, w, bias, "silu") for s in (0, 3)]
    outs.append(ops.causal_conv1d_update(x[..., 6:], state, w, bias, "silu"))
    torch.testing.assert_close(torch.cat(outs, -1), full, atol=1e-12, rtol=1e-12)


def test_conv_update_indices_touch_only_selected_rows():
    r = gen(5)
    w, x = randn(4, 4, g=r), randn(2, 4, g=r)
    state = randn(5, 4, 4, g=r)
    before = state.clone()
    idx = torch.tensor([3, 1])
    out = ops.causal_conv1d_update(x, state, w, conv_state_indices=idx)
    want = ops.causal_conv1d_update(x, before[idx].clone(), w)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(state[[0, 2, 4]], before[[0, 2, 4]])
    torch.testing.assert_close(state[idx], torch.cat([before[idx][..., 1:], x[..., None]], -1))


def test_selective_state_update_steps_equal_recurrence():
    a = ssm_inputs(b=3, length=6, seed=6)
    h, p, n = 4, 3, 5
    want_y, want_state = recurrence(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                    a["dt_bias"], a["init"])
    # Megatron's decode call: per-(head, channel) A / dt / D / dt_bias, [b, s, ...] inputs
    A = a["A"][:, None, None].expand(h, p, n)
    state = a["init"].clone()
    for t in range(6):
        y = ops.selective_state_update(
            state, a["x"][:, t:t + 1], a["dt"][:, t:t + 1, :, None].expand(-1, -1, -1, p), A,
            a["B"][:, t:t + 1], a["C"][:, t:t + 1], D=a["D"][:, None].expand(h, p),
            z=a["z"][:, t:t + 1], dt_bias=a["dt_bias"][:, None].expand(h, p), dt_softplus=True)
        torch.testing.assert_close(y[:, 0], want_y[:, t], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, want_state, atol=1e-12, rtol=1e-12)
    # mamba_ssm's call without a seqlen dimension, and several positions at once
    state = a["init"].clone()
    y0 = ops.selective_state_update(state, a["x"][:, 0], a["dt"][:, 0, :, None].expand(-1, -1, p),
                                    A, a["B"][:, 0], a["C"][:, 0], D=a["D"][:, None].expand(h, p),
                                    z=a["z"][:, 0], dt_bias=a["dt_bias"][:, None].expand(h, p),
                                    dt_softplus=True)
    torch.testing.assert_close(y0, want_y[:, 0], atol=1e-12, rtol=1e-12)
    y = ops.selective_state_update(
        state, a["x"][:, 1:], a["dt"][:, 1:, :, None].expand(-1, -1, -1, p), A, a["B"][:, 1:],
        a["C"][:, 1:], D=a["D"][:, None].expand(h, p), z=a["z"][:, 1:],
        dt_bias=a["dt_bias"][:, None].expand(h, p), dt_softplus=True)
    torch.testing.assert_close(y, want_y[:, 1:], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, want_state, atol=1e-12, rtol=1e-12)
    # The same values materialised (no stride-0 per-head views: the untied path)
    state = a["init"].clone()
    y = ops.selective_state_update(
        state, a["x"], a["dt"][..., None].expand(-1, -1, -1, p).contiguous(), A.contiguous(),
        a["B"], a["C"], D=a["D"][:, None].expand(h, p).contiguous(), z=a["z"],
        dt_bias=a["dt_bias"][:, None].expand(h, p).contiguous(), dt_softplus=True)
    torch.testing.assert_close(y, want_y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, want_state, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rmsnorm(norm_before_gate):
    r = gen(7)
    x, z, w = randn(2, 3, 12, g=r), randn(2, 3, 12, g=r), randn(12, g=r)
    norm = ops.RMSNormGated(12, eps=1e-5, group_size=4, norm_before_gate=norm_before_gate,
                            dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(w)
    gate = z * torch.sigmoid(z)
    inp = x if norm_before_gate else x * gate
    groups = inp.reshape(2, 3, 3, 4)
    want = (groups / torch.sqrt((groups ** 2).mean(-1, keepdim=True) + 1e-5)).reshape(2, 3, 12)
    want = want * w * (gate if norm_before_gate else 1)
    torch.testing.assert_close(norm(x, z), want, atol=1e-12, rtol=1e-12)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


def test_split_conv1d_scan_combined_equals_its_parts():
    """Megatron's training call: split [z, xBC, dt], conv + silu, scan with D, then gate."""
    r = gen(8)
    b, length, h, p, g, n, w = 2, 11, 4, 3, 2, 5, 4
    dim, conv_dim = h * p, h * p + 2 * g * n
    zxbcdt = randn(b, length, 2 * dim + 2 * g * n + h, g=r)
    cw, cb = randn(conv_dim, w, g=r), randn(conv_dim, g=r)
    dt_bias, A, D = randn(h, g=r), -torch.rand(h, generator=r, dtype=F64) - 0.5, randn(h, g=r)
    out = ops.mamba_split_conv1d_scan_combined(zxbcdt, cw, cb, dt_bias, A, D, chunk_size=4,
                                               headdim=p, ngroups=g, norm_before_gate=False)
    z, xbc, dt = zxbcdt.split([dim, conv_dim, h], -1)
    xbc = direct_conv(xbc.transpose(1, 2), cw, cb, silu=True).transpose(1, 2)
    x, B, C = xbc.split([dim, g * n, g * n], -1)
    y, _ = recurrence(x.reshape(b, length, h, p), dt, A, B.reshape(b, length, g, n),
                      C.reshape(b, length, g, n), D, z.reshape(b, length, h, p), dt_bias)
    torch.testing.assert_close(out, y.reshape(b, length, dim), atol=1e-11, rtol=1e-11)
    # with the gated norm fused in: norm(y * silu(z)) per group
    rw = randn(dim, g=r)
    out = ops.mamba_split_conv1d_scan_combined(zxbcdt, cw, cb, dt_bias, A, D, chunk_size=4,
                                               headdim=p, ngroups=g, rmsnorm_weight=rw,
                                               norm_before_gate=False)
    y, _ = recurrence(x.reshape(b, length, h, p), dt, A, B.reshape(b, length, g, n),
                      C.reshape(b, length, g, n), D, None, dt_bias)
    want = ops.rmsnorm_fn(y.reshape(b, length, dim), rw, z=z, eps=1e-6, group_size=dim // g,
                          norm_before_gate=False)
    torch.testing.assert_close(out, want, atol=1e-11, rtol=1e-11)


# --------------------------------------------------------------------------------------
# transformers' torch fallbacks (an outside implementation), when transformers imports


@pytest.fixture(scope="module")
def hf():
    nemotron_h = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    return nemotron_h, mamba2


def test_chunk_scan_matches_transformers(hf):
    a = ssm_inputs(length=45, seed=11)
    # transformers computes in float32 whatever the input dtype
    want, want_state = hf[0].mamba2_chunk_scan(
        a["x"], a["dt"], a["A"], a["B"], a["C"], 16, D=a["D"], dt_bias=a["dt_bias"],
        initial_states=a["init"], dt_softplus=True, return_final_states=True)
    got, state = ops.mamba_chunk_scan_combined(
        a["x"], a["dt"], a["A"], a["B"], a["C"], 8, D=a["D"], dt_bias=a["dt_bias"],
        initial_states=a["init"], dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(got, want.to(F64), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(state, want_state.to(F64), atol=2e-5, rtol=1e-5)


def test_conv_matches_transformers(hf):
    mamba2 = hf[1]
    r = gen(12)
    x, w, bias = randn(2, 6, 10, g=r), randn(6, 4, g=r), randn(6, g=r)
    torch.testing.assert_close(ops.causal_conv1d_fn(x, w, bias, activation="silu"),
                               mamba2.causal_conv1d_fn(x, w, bias, activation="silu"),
                               atol=1e-12, rtol=1e-12)
    s_ours, s_hf = torch.zeros(2, 6, 4, dtype=F64), torch.zeros(2, 6, 4, dtype=F64)
    for t in range(10):
        torch.testing.assert_close(
            ops.causal_conv1d_update(x[..., t:t + 1], s_ours, w, bias, "silu"),
            mamba2.causal_conv1d_update(x[..., t:t + 1], s_hf, w, bias, "silu"),
            atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s_ours, s_hf)


def test_unsupported_options_fail_loudly():
    a = ssm_inputs(b=1, length=4)
    with pytest.raises(NotImplementedError, match="packed"):
        ops.mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], 4,
                                      seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    assert math.isclose(float(F.softplus(torch.tensor(-1e4))), 0.0)  # the padding trick's basis
