"""Mamba-2 in plain PyTorch: the kernels Megatron's `MambaMixer` calls, for machines without
`mamba_ssm` / `causal_conv1d` (CPU, CI).

Every function keeps the signature and semantics of the CUDA/Triton kernel it stands in for,
so the mixer code that calls it is unchanged (the conv and the gated norm live in `conv.py` and
`norm.py`, re-exported here):

| here | stands in for |
|---|---|
| `mamba_chunk_scan_combined` | `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined` |
| `mamba_split_conv1d_scan_combined` | `mamba_ssm...ssd_combined.mamba_split_conv1d_scan_combined` |
| `causal_conv1d_fn`, `causal_conv1d_update` | `causal_conv1d` (channel-first, [batch, dim, len]) |
| `selective_state_update` | `mamba_ssm...selective_state_update` / Megatron's Triton version |
| `RMSNormGated`, `rmsnorm_fn` | `mamba_ssm.ops.triton.layernorm_gated` |
| `ssd_states_at` | (none: the SSM state after given positions, for branches that fork) |

The SSD scan is the chunked ("state-space duality") algorithm of Mamba-2: inside a chunk the
output is a masked, decayed attention-like product; chunk-final states are passed from chunk
to chunk by the recurrence h_c = exp(sum dA over chunk) h_{c-1} + state_c. Work is done in
float32 (float64 when the inputs are float64); outputs come back in the input dtype.

The recurrence every kernel implements, per head h, position t (dt after bias/softplus):

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T      [headdim, d_state]
    y_t     = state_t C_t + D_h x_t          (then * silu(z_t) when z is given)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_rlp.models.mamba.conv import causal_conv1d_fn, causal_conv1d_update
from megatron_rlp.models.mamba.elementwise import compute_dtype
from megatron_rlp.models.mamba.norm import RMSNormGated, rmsnorm_fn

__all__ = [
    "RMSNormGated",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "rmsnorm_fn",
    "selective_state_update",
    "ssd_states_at",
]


def _discretize_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool,
                   dt_limit: tuple[float, float], dtype: torch.dtype) -> Tensor:
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    state_dtype: torch.dtype | None = None,
):
    """Chunked SSD scan.

    Args:
        x: [batch, seqlen, nheads, headdim].
        dt: [batch, seqlen, nheads] (before `dt_bias` / softplus).
        A: [nheads] (negative).
        B, C: [batch, seqlen, ngroups, dstate]; heads are split evenly over groups.
        chunk_size: positions per chunk.
        D: [nheads] or [nheads, headdim] skip connection.
        z: [batch, seqlen, nheads, headdim]: gate, output *= silu(z).
        dt_bias: [nheads]; dt_softplus: apply softplus after the bias; dt_limit: clamp after.
        initial_states: [batch, nheads, headdim, dstate].
        seq_idx, cu_seqlens, return_varlen_states: packed sequences; not supported here.
        return_final_states: also return the state after the last position.
        state_dtype: dtype of the returned final state (default: float32, or float64).

    Returns:
        out [batch, seqlen, nheads, headdim] in x's dtype, and the final state
        [batch, nheads, headdim, dstate] when `return_final_states`.
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("packed sequences (seq_idx/cu_seqlens) are not supported by "
                                  "the pure-torch Mamba-2 scan")
    b, length, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    if h % g:
        raise ValueError(f"nheads={h} is not a multiple of ngroups={g}")
    k = h // g  # heads per group
    cd = compute_dtype(x, dt, B, C, initial_states)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)  # [b, l, h]
    xf, Bf, Cf = x.to(cd), B.to(cd), C.to(cd)

    T = chunk_size
    pad = (-length) % T
    nc = (length + pad) // T

    def chunks(t: Tensor) -> Tensor:  # [b, l, ...] -> [b, c, T, ...], zero padded
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc, T, *t.shape[2:])

    # Layout [b, c, g, k, T, ...]: batch, chunk, group, head-in-group lead, so every
    # contraction below is a batched matmul. Padded positions have dt = 0: no decay and no
    # input, so the final state is exact.
    xdt = chunks(xf * dt[..., None]).reshape(b, nc, T, g, k, p).permute(0, 1, 3, 4, 2, 5)
    Bc = chunks(Bf).transpose(2, 3)  # [b, c, g, T, n]
    Cc = chunks(Cf).transpose(2, 3)
    dA = chunks(dt * A.to(cd)).reshape(b, nc, T, g, k).permute(0, 1, 3, 4, 2)  # [b,c,g,k,T]
    cs = torch.cumsum(dA, dim=-1)

    # 1. Inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -math.inf))
    scores = Cc @ Bc.transpose(-1, -2)  # [b, c, g, T(l), T(s)]
    y = (scores[:, :, :, None] * decay) @ xdt  # [b, c, g, k, T, p]

    # 2. State each chunk adds at its end: sum_s exp(cs_T - cs_s) dt_s x_s B_s^T
    to_end = torch.exp(cs[..., -1:] - cs)  # [b, c, g, k, T]
    chunk_states = (xdt * to_end[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # [.., p, n]

    # 3. Pass states from chunk to chunk (a short recurrence over chunks).
    if initial_states is None:
        state = torch.zeros(b, g, k, p, n, dtype=cd, device=x.device)
    else:
        state = initial_states.to(cd).reshape(b, g, k, p, n)
    chunk_decay = torch.exp(cs[..., -1])  # [b, c, g, k]
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    prev = torch.stack(entering, dim=1)  # [b, c, g, k, p, n]: state entering each chunk

    # 4. What the entering state contributes: y_l += exp(cs_l) C_l . state
    y = y + (Cc[:, :, :, None] @ prev.transpose(-1, -2)) * torch.exp(cs)[..., None]
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * T, h, p)[:, :length]

    if D is not None:
        Df = D.to(cd)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(cd))
    out = y.to(x.dtype)
    if return_final_states:
        final = state.reshape(b, h, p, n).to(state_dtype or cd)
        return out, final
    return out


def ssd_states_at(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    rows: Tensor,
    ends: Tensor,
    chunk_size: int,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_states: Tensor | None = None,
) -> Tensor:
    """SSM states of the scan `mamba_chunk_scan_combined` runs, after the first `ends[k]`
    positions of batch row `rows[k]`: the state a decode (or a branch scan) continues from.

    state_e = exp(sum_{s<e} dA_s) h_0 + sum_{s<e} exp(sum_{s<u<e} dA_u) dt_s x_s B_s^T, with
    dA = dt * A (the recurrence in the module docstring). Computed chunk-wise as the scan
    does: the state entering each chunk (chunk recurrence), then the partial chunk up to e,
    so decays are differences of cumulative sums inside one chunk only (no fp32 cancellation
    over long sequences). Differentiable in x, dt, A, B, dt_bias and initial_states. Pure
    torch on any device; mamba_ssm has no state-at-positions kernel (its scan returns the
    final state only).

    Args:
        x: [batch, seqlen, nheads, headdim]; dt: [batch, seqlen, nheads] (before bias/softplus).
        A: [nheads]; B: [batch, seqlen, ngroups, dstate].
        rows: [K] long, batch row of each requested state.
        ends: [K] long in [0, seqlen]: the state after positions [0, ends[k]).
        chunk_size: positions per chunk (the result does not depend on it, only rounding).
        initial_states: [batch, nheads, headdim, dstate], the state before position 0.

    Returns:
        [K, nheads, headdim, dstate] in float32 (float64 when the inputs are float64).
    """
    b, length, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    cd = compute_dtype(x, dt, B, initial_states)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)  # [b, l, h]
    T = chunk_size
    nc = -(-length // T)
    pad = nc * T - length + T  # one extra all-zero chunk: ends == seqlen on a chunk edge

    def chunks(t: Tensor) -> Tensor:  # [b, l, ...] -> [b, c + 1, T, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc + 1, T, *t.shape[2:])

    xdt = chunks(x.to(cd) * dt[..., None])  # [b, c, T, h, p]
    Bh = chunks(B.to(cd).repeat_interleave(h // g, dim=2))  # [b, c, T, h, n]
    cs = torch.cumsum(chunks(dt * A.to(cd)), dim=2)  # [b, c, T, h], inside each chunk
    to_end = torch.exp(cs[:, :, -1:] - cs)  # [b, c, T, h]
    chunk_states = torch.einsum("bcthp,bcthn->bchpn", xdt * to_end[..., None], Bh)
    state = (torch.zeros(b, h, p, n, dtype=cd, device=x.device) if initial_states is None
             else initial_states.to(cd))
    entering = []
    for c in range(nc + 1):
        entering.append(state)
        state = state * torch.exp(cs[:, c, -1])[..., None, None] + chunk_states[:, c]
    prev = torch.stack(entering, dim=1)  # [b, c + 1, h, p, n]

    rows, ends = rows.to(x.device), ends.to(x.device)
    c, j = ends // T, ends % T  # the state after e: chunk c entered, then its j first positions
    cs_c = cs[rows, c]  # [K, T, h]
    last = cs_c.gather(1, (j - 1).clamp(min=0)[:, None, None].expand(-1, 1, h))  # [K, 1, h]
    before = torch.arange(T, device=x.device)[None, :] < j[:, None]  # [K, T]
    weight = torch.exp((last - cs_c).masked_fill(~before[..., None], -math.inf))  # [K, T, h]
    inner = torch.einsum("kthp,kthn->khpn", xdt[rows, c] * weight[..., None], Bh[rows, c])
    decay = torch.where(j[:, None] > 0, torch.exp(last[:, 0]), torch.ones_like(last[:, 0]))
    return prev[rows, c] * decay[..., None, None] + inner


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: Tensor | None = None,
    intermediate_ssm_states: Tensor | None = None,
) -> Tensor:
    """One (or a few) recurrent SSM steps from a cached state, updating `state` in place.

    Shapes follow mamba_ssm (and Megatron's Triton port, which adds an optional seqlen):
        state: [batch, nheads, headdim, dstate] (or [batch, dim, dstate]: one head)
        x, dt, z: [batch, (seqlen,) (nheads,) headdim]
        A: [(nheads,) headdim, dstate]; D, dt_bias: [(nheads,) headdim]
        B, C: [batch, (seqlen,) (ngroups,) dstate]
        state_batch_indices: [batch] rows of `state` to use (default: 0..batch-1).

    Returns:
        y shaped like x: state C + D x, times silu(z) when z is given.
    """
    if intermediate_ssm_states is not None:
        raise NotImplementedError("intermediate_ssm_states (speculative decoding) is not "
                                  "supported by the pure-torch state update")
    has_heads = state.dim() == 4
    if not has_heads:  # one head: [batch, dim, dstate]
        state_v = state[:, None]
        seq_first = x.dim() == 3  # [batch, seqlen, dim]
        unsq = (lambda t: t[:, :, None]) if seq_first else (lambda t: t[:, None, None])
        x, dt, B, C = unsq(x), unsq(dt), unsq(B), unsq(C)
        z = None if z is None else unsq(z)
        A = A[None]
        D = None if D is None else D[None]
        dt_bias = None if dt_bias is None else dt_bias[None]
        squeeze = () if seq_first else (1,)
        heads_squeeze = True
    else:
        state_v = state
        seq_first = x.dim() == 4
        if not seq_first:
            x, dt, B, C = x[:, None], dt[:, None], B[:, None], C[:, None]
            z = None if z is None else z[:, None]
        squeeze = () if seq_first else (1,)
        heads_squeeze = False
    # now: x, dt, z [b, s, h, p]; B, C [b, s, g, n]; state_v [b, h, p, n]; A [h, p, n]
    h = x.shape[2]
    g = B.shape[2]
    cd = compute_dtype(state, x, dt, B, C)
    st = state_v if state_batch_indices is None else state_v[state_batch_indices]
    st = st.to(cd)
    # Mamba-2 (Megatron's decode call): A, dt and dt_bias are per head, expanded (stride 0)
    # over headdim (and dstate): discretise per head, not per [headdim, dstate] element (the
    # Triton kernel's TIE_HDIM path). Per decode step that spares an exp over the whole state.
    tied = (A.dim() == 3 and A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0
            and (dt_bias is None or dt_bias.stride(-1) == 0))
    if tied:
        dt, A = dt[..., :1], A[:, :1, 0]  # [b, s, h, 1], [h, 1]
        dt_bias = None if dt_bias is None else dt_bias[..., :1]
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.to(cd).repeat_interleave(h // g, dim=2)  # [b, s, h, n]
    Ch = C.to(cd).repeat_interleave(h // g, dim=2)
    Af = A.to(cd)
    ys = []
    for t in range(x.shape[1]):
        xt, dtt = x[:, t].to(cd), dt[:, t]  # [b, h, p] (tied: [b, h, 1])
        decay = torch.exp(dtt * Af)[..., None] if tied else torch.exp(dtt[..., None] * Af)
        st = st * decay + (dtt * xt)[..., None] * Bh[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", st, Ch[:, t])
        if D is not None:
            y = y + D.to(cd) * xt
        if z is not None:
            y = y * F.silu(z[:, t].to(cd))
        ys.append(y)
    if state_batch_indices is None:
        state_v.copy_(st.to(state.dtype))
    else:
        state_v[state_batch_indices] = st.to(state.dtype)
    out = torch.stack(ys, dim=1).to(x.dtype)  # [b, s, h, p]
    if heads_squeeze:
        out = out[:, :, 0]
    for dim in squeeze:
        out = out.squeeze(dim)
    return out


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor,
    chunk_size: int,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    activation: str = "silu",
    rmsnorm_weight: Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    state_dtype: torch.dtype | None = None,
):
    """Split [z, xBC, dt], causal conv on xBC, SSD scan with D skip, then either the z gate
    (no `rmsnorm_weight`) or the gated RMSNorm, then the optional output projection.

    Args:
        zxbcdt: [batch, seqlen, 2 * dim + 2 * ngroups * dstate + nheads], dim = nheads * headdim.
        conv1d_weight: [dim + 2 * ngroups * dstate, width]; conv1d_bias: matching.
        dt_bias, A: [nheads]; D: [nheads] (then `headdim` is required) or [nheads, headdim].

    Returns:
        [batch, seqlen, dim] (or [batch, seqlen, out_dim] with `outproj_weight`).
    """
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is required when D is 1-D")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    b, length, width = zxbcdt.shape
    dim = nheads * headdim
    dstate = (width - 2 * dim - nheads) // ngroups // 2
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias,
                           activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    res = mamba_chunk_scan_combined(
        x.reshape(b, length, nheads, headdim), dt, A,
        B.reshape(b, length, ngroups, dstate), C.reshape(b, length, ngroups, dstate),
        chunk_size, D=D, z=None if rmsnorm_weight is not None else
        z.reshape(b, length, nheads, headdim), dt_bias=dt_bias, initial_states=initial_states,
        dt_softplus=True, dt_limit=dt_limit, return_final_states=return_final_states,
        state_dtype=state_dtype)
    y, final = res if return_final_states else (res, None)
    y = y.reshape(b, length, dim)
    if rmsnorm_weight is not None:
        y = rmsnorm_fn(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                       norm_before_gate=norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


