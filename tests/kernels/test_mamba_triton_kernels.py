"""mamba-ssm's and Megatron's Mamba-2 Triton kernels, run under Triton's interpreter on CPU
(`helpers.triton_cpu`), against the project's torch ops (`models.mamba.ops`), forward and
backward, at the tiny hybrid's shapes (4 heads of 16, state 8, 2 groups; `tests/helpers/
tiny_models.py`), with states forked at a prefix. The cases at tiny_hybrid_cpu.yaml's shapes
(16 heads of 32, state 32) are slow.

Tolerance: fp32 kernels against fp32 torch; the differences are summation-order rounding
(measured: ~1e-6 relative to the largest value), bounded here by 2e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlp.models.mamba import adapter, ops

TINY = dict(heads=4, headdim=16, dstate=8, ngroups=2)  # tests/helpers/tiny_models.TINY_HYBRID
RECIPE = dict(heads=16, headdim=32, dstate=32, ngroups=2)  # examples/configs/tiny_hybrid_cpu
D_CONV = 4


def assert_near(got, want, what: str, rel: float = 2e-5) -> None:
    err = float((got.detach().float() - want.detach().float()).abs().max())
    scale = max(1.0, float(want.detach().float().abs().max()))
    assert err <= rel * scale, f"{what}: max |kernel - torch| = {err:.3g} (scale {scale:.3g})"


def scan_inputs(batch, length, heads, headdim, dstate, ngroups, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return dict(x=r(batch, length, heads, headdim), dt=r(batch, length, heads, scale=0.5),
                A=-torch.rand(heads, generator=g) * 2 - 0.5, B=r(batch, length, ngroups, dstate),
                C=r(batch, length, ngroups, dstate), D=r(heads), z=r(batch, length, heads, headdim),
                dt_bias=r(heads, scale=0.5))


def leaves(tensors: dict) -> dict:
    return {k: v.clone().requires_grad_() for k, v in tensors.items()}


def forked_states(inp: dict, prefix: int, chunk: int) -> torch.Tensor:
    """The SSM states after `prefix` positions of each row (`ops.ssd_states_at`), as a branch
    forked there starts from; differentiable in the inputs."""
    b = inp["x"].shape[0]
    return ops.ssd_states_at(inp["x"][:, :prefix], inp["dt"][:, :prefix], inp["A"],
                             inp["B"][:, :prefix], torch.arange(b), torch.full((b,), prefix),
                             chunk, dt_bias=inp["dt_bias"], dt_softplus=True)


def run_scan(scan, inp: dict, prefix: int, chunk: int, seq_idx=None):
    """Scan positions [prefix, L) from the states forked at `prefix`; loss of output and final
    state; returns (out, final, grads of every input)."""
    p = leaves(inp)
    init = forked_states(p, prefix, chunk)
    tail = {k: (v[:, prefix:] if v.dim() > 1 else v) for k, v in p.items()}
    out, final = scan(tail["x"], tail["dt"], p["A"], tail["B"], tail["C"], chunk, D=p["D"],
                      z=tail["z"], dt_bias=p["dt_bias"], initial_states=init, seq_idx=seq_idx,
                      dt_softplus=True, return_final_states=True)
    (out.square().mean() + final.sin().sum()).backward()
    return out, final, {k: v.grad for k, v in p.items()}


def check_scan(kernels, shape: dict, batch: int, length: int, prefix: int, chunk: int):
    inp = scan_inputs(batch, length, **shape)
    got = run_scan(kernels.ssd.mamba_chunk_scan_combined, inp, prefix, chunk)
    want = run_scan(ops.mamba_chunk_scan_combined, inp, prefix, chunk)
    assert_near(got[0], want[0], "output")
    assert_near(got[1], want[1], "final state")
    for name in inp:
        assert_near(got[2][name], want[2][name], f"d{name}")


def test_chunk_scan_from_forked_states(kernels):
    """mamba_chunk_scan_combined with initial_states (forked after 7 positions) and
    return_final_states, over 2 chunks (state passing), forward and backward."""
    check_scan(kernels, TINY, batch=2, length=7 + 24, prefix=7, chunk=16)


@pytest.mark.slow
def test_chunk_scan_recipe_shapes(kernels):
    check_scan(kernels, RECIPE, batch=2, length=9 + 64, prefix=9, chunk=32)


def test_chunk_scan_seq_idx(kernels):
    """seq_idx packs two sequences in one row (a boundary inside a chunk): each part equals its
    own torch scan; the final state is the last part's, forward and backward."""
    length, cut, chunk = 32, 13, 16
    inp = scan_inputs(1, length, **TINY, seed=1)
    seq_idx = (torch.arange(length) >= cut).int()[None]
    p = leaves(inp)
    out, final = kernels.ssd.mamba_chunk_scan_combined(
        p["x"], p["dt"], p["A"], p["B"], p["C"], chunk, D=p["D"], z=p["z"],
        dt_bias=p["dt_bias"], seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    (out.square().mean() + final.sin().sum()).backward()

    q = leaves(inp)
    parts = []
    for lo, hi in ((0, cut), (cut, length)):
        seg = {k: (v[:, lo:hi] if v.dim() > 1 else v) for k, v in q.items()}
        parts.append(ops.mamba_chunk_scan_combined(
            seg["x"], seg["dt"], q["A"], seg["B"], seg["C"], chunk, D=q["D"], z=seg["z"],
            dt_bias=q["dt_bias"], dt_softplus=True, return_final_states=True))
    ref_out = torch.cat([parts[0][0], parts[1][0]], dim=1)
    (ref_out.square().mean() + parts[1][1].sin().sum()).backward()
    assert_near(out, ref_out, "output")
    assert_near(final, parts[1][1], "final state")
    for name in inp:
        assert_near(p[name].grad, q[name].grad, f"d{name}")


def split_conv_scan_args(shape: dict, batch: int, length: int, seed: int = 2):
    """Megatron's `_ssm_training` call of mamba_split_conv1d_scan_combined: zxBCdt [b, l, d],
    conv weight [conv_dim, 4], per-head D (`D_has_hdim=False`), no fused norm."""
    h, p, n, g = shape["heads"], shape["headdim"], shape["dstate"], shape["ngroups"]
    conv_dim = h * p + 2 * g * n
    gen = torch.Generator().manual_seed(seed)
    return dict(zxbcdt=torch.randn(batch, length, h * p + conv_dim + h, generator=gen),
                conv1d_weight=torch.randn(conv_dim, D_CONV, generator=gen) * 0.5,
                conv1d_bias=torch.randn(conv_dim, generator=gen) * 0.1,
                dt_bias=torch.randn(h, generator=gen) * 0.5,
                A=-torch.rand(h, generator=gen) * 2 - 0.5, D=torch.randn(h, generator=gen))


def run_split_conv_scan(fn, args: dict, shape: dict, chunk: int):
    p = leaves(args)
    y = fn(**p, chunk_size=chunk, activation="silu", headdim=shape["headdim"],
           ngroups=shape["ngroups"], norm_before_gate=False)
    y.square().mean().backward()
    return y, {k: v.grad for k, v in p.items()}


def test_split_conv_scan_training_path(kernels):
    """mamba_split_conv1d_scan_combined as Megatron's training forward calls it (the causal
    conv inside it is causal-conv1d's, emulated by the torch reference: see triton_cpu)."""
    args = split_conv_scan_args(TINY, batch=2, length=24)
    got = run_split_conv_scan(kernels.ssd.mamba_split_conv1d_scan_combined, args, TINY, 16)
    want = run_split_conv_scan(ops.mamba_split_conv1d_scan_combined, args, TINY, 16)
    assert_near(got[0], want[0], "output")
    for name in args:
        assert_near(got[1][name], want[1][name], f"d{name}")


def run_norm(norm_cls, x, z, weight, group_size):
    norm = norm_cls(x.shape[-1], eps=1e-5, group_size=group_size, norm_before_gate=False)
    with torch.no_grad():
        norm.weight.copy_(weight)
    xs, zs = x.clone().requires_grad_(), z.clone().requires_grad_()
    y = norm(xs, zs)
    y.square().mean().backward()
    return y, xs.grad, zs.grad, norm.weight.grad


@pytest.mark.parametrize("shape", [TINY, pytest.param(RECIPE, marks=pytest.mark.slow)],
                         ids=["tiny", "recipe"])
def test_gated_rmsnorm(kernels, shape):
    """mamba-ssm's Triton gated RMSNorm as Megatron's mixer builds it (group = d_inner /
    ngroups, norm(x * silu(z))), forward and backward, on [l, b, d_inner] activations."""
    d = shape["heads"] * shape["headdim"]
    gen = torch.Generator().manual_seed(3)
    x, z = torch.randn(24, 2, d, generator=gen), torch.randn(24, 2, d, generator=gen)
    weight = 1 + 0.1 * torch.randn(d, generator=gen)
    got = run_norm(kernels.layernorm_gated.RMSNorm, x, z, weight, d // shape["ngroups"])
    want = run_norm(ops.RMSNormGated, x, z, weight, d // shape["ngroups"])
    for name, a, b in zip(("output", "dx", "dz", "dweight"), got, want, strict=True):
        assert_near(a, b, name)


def decode_inputs(shape: dict, batch: int, seed: int = 4):
    """Megatron `_ssm_decode`'s layout: A, dt, dt_bias, D expanded over headdim (stride 0)."""
    h, p, n, g = shape["heads"], shape["headdim"], shape["dstate"], shape["ngroups"]
    gen = torch.Generator().manual_seed(seed)
    A = (-torch.rand(h, generator=gen) * 2 - 0.5)[:, None, None].expand(h, p, n)
    return dict(x=torch.randn(batch, 1, h, p, generator=gen),
                dt=torch.randn(batch, 1, h, generator=gen)[..., None].expand(batch, 1, h, p),
                A=A, B=torch.randn(batch, 1, g, n, generator=gen),
                C=torch.randn(batch, 1, g, n, generator=gen),
                D=torch.randn(h, generator=gen)[:, None].expand(h, p),
                z=torch.randn(batch, 1, h, p, generator=gen),
                dt_bias=(torch.randn(h, generator=gen) * 0.5)[:, None].expand(h, p))


@pytest.mark.parametrize("shape", [TINY, pytest.param(RECIPE, marks=pytest.mark.slow)],
                         ids=["tiny", "recipe"])
def test_decode_step_from_forked_state(kernels, shape):
    """Megatron's Triton selective_state_update (as the adapter binds it: no writes into x, see
    `adapter.no_dummy_state_writes`) and causal_conv1d_update (its decode path) from states
    forked at a prefix (rows 0, 0, 1: a fork duplicates a context), 3 steps: outputs and the
    in-place updated states equal the torch kernels', the inputs stay untouched."""
    h, p, n, g = shape["heads"], shape["headdim"], shape["dstate"], shape["ngroups"]
    prefix = scan_inputs(2, 11, **shape, seed=5)
    rows = torch.tensor([0, 0, 1])
    ssm = forked_states(prefix, 11, 16)[rows].contiguous()  # [3, h, p, n]
    conv_dim = h * p + 2 * g * n
    gen = torch.Generator().manual_seed(6)
    conv = torch.randn(2, conv_dim, D_CONV, generator=gen)[rows].contiguous()
    weight = torch.randn(conv_dim, D_CONV, generator=gen) * 0.5
    bias = torch.randn(conv_dim, generator=gen) * 0.1
    states = {"kernel": (ssm.clone(), conv.clone()), "torch": (ssm.clone(), conv.clone())}
    for step in range(3):
        inp = decode_inputs(shape, 3, seed=10 + step)
        xbc = torch.randn(3, 1, conv_dim, generator=gen)
        got_c = kernels.conv_update.causal_conv1d_update(xbc, states["kernel"][1], weight, bias,
                                                         "silu", None)
        want_c = ops.causal_conv1d_update(xbc.transpose(1, 2), states["torch"][1], weight, bias,
                                          "silu").transpose(1, 2)
        assert_near(got_c, want_c, f"conv output, step {step}")
        assert_near(states["kernel"][1], states["torch"][1], f"conv state, step {step}")
        before = {k: v.clone() for k, v in inp.items()}
        update = adapter.no_dummy_state_writes(kernels.decode.selective_state_update)
        got = update(states["kernel"][0], **inp, dt_softplus=True)
        for name, value in inp.items():
            assert torch.equal(value, before[name]), f"the decode kernel wrote into {name}"
        want = ops.selective_state_update(states["torch"][0], **inp, dt_softplus=True)
        assert_near(got, want, f"ssm output, step {step}")
        assert_near(states["kernel"][0], states["torch"][0], f"ssm state, step {step}")
