"""Mamba layers on branch-packed sequences and shared-window prefills: every branch starts
from the conv/SSM state at its prefix end t_k, taken from one scan over the window.

A recurrence has no attention mask, so the tree mask that packs `window | branch_0 |
branch_1 | ...` into one sequence (`packing.tree`) cannot tell a Mamba layer that branch 1
starts at t_1 of the window rather than after branch 0. Given the packed layout, which
`attach_branch_layout` registers for the tree mask, each `LocalMambaLayer`'s mixer instead:

1. gathers the window part of every packed sequence and runs the causal conv and SSD scan
   over it (as the unpacked rows' prefixes, which all start at the window's first column);
2. takes, differentiably, each branch's conv state (the d_conv - 1 pre-conv inputs before
   t_k) and SSM state after t_k (`ops.ssd_states_at`, exact, chunk-wise);
3. runs all branches as one batch, the conv from those inputs and the scan from those
   initial states (`mamba_chunk_scan_combined(initial_states=...)`: mamba_ssm's kernel on
   GPU, `ops` on CPU), and
4. puts the outputs back in packed order (padding gets zeros), then gate/norm and `out_proj`
   as Megatron's `_ssm_prefill` does.

Gradients reach the window from every branch through the states, as the sum of the unpacked
prefix copies' gradients. Under `mamba_states_at(model, rows, ends)` a rollout prefill of
document windows (`packing.prefill.prefill_shared`) leaves in each Mamba layer's cache one
`MambaState` per context, the states at that context's prefix end, so its G thoughts fork
from them.

Written here (not Megatron's): Megatron's mixer packs sequences only block-diagonally
(`seq_idx`), and its state extraction at arbitrary positions exists only inside dynamic
batching's Triton kernels (CUDA).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.ssm import mamba_mixer as mm
from torch import Tensor

from megatron_rlp.models.mamba import ops
from megatron_rlp.models.mamba.adapter import scan_chunk
from megatron_rlp.models.mamba.inference_state import MambaState
from megatron_rlp.models.masks import WINDOW


@dataclass
class BranchLayout:
    """Where windows and branches lie in a micro-batch of packed sequences ([N, S]).

    Attributes:
        win_len: [N] window tokens of each sequence (columns [0, win_len)).
        br_seq: [R] sequence of each branch (R = N * K, K branches per sequence).
        br_cols: [R, Lb] packed columns of each branch's tokens (clamped where invalid).
        br_valid: [R, Lb] bool, real branch tokens.
        br_end: [R] the branch's prefix end t_k as a window column (exclusive).
    """

    win_len: Tensor
    br_seq: Tensor
    br_cols: Tensor
    br_valid: Tensor
    br_end: Tensor

    @classmethod
    def from_packed(cls, branch: Tensor, hi: Tensor) -> BranchLayout:
        """From `packing.tree.pack_branches`' descriptors: branch [N, S] (-1 window, >= 0
        branch, -2 padding) and hi [N, S] (a branch token's prefix end). Two host syncs
        (sizes), once per micro-batch."""
        n_seq, s = branch.shape
        k = int(branch.max()) + 1
        member = branch[:, :, None] == torch.arange(k, device=branch.device)  # [N, S, K]
        length = member.sum(1)  # [N, K]
        start = member.int().argmax(1)  # first column of each branch
        lb = int(length.max())
        steps = torch.arange(lb, device=branch.device)
        cols = (start[..., None] + steps).clamp(max=s - 1)  # [N, K, Lb]
        seq = torch.arange(n_seq, device=branch.device)[:, None].expand(n_seq, k)
        return cls(win_len=(branch == WINDOW).sum(1), br_seq=seq.reshape(-1),
                   br_cols=cols.reshape(n_seq * k, lb),
                   br_valid=(steps < length[..., None]).reshape(n_seq * k, lb),
                   br_end=hi.gather(1, start).reshape(-1))


_LAYOUTS: dict[tuple, BranchLayout] = {}  # by the tree mask's storage: see register_layout


def _mask_key(mask: Tensor) -> tuple:
    return mask.data_ptr(), tuple(mask.shape), str(mask.device)


def register_layout(mask: Tensor, branch: Tensor, lo: Tensor, hi: Tensor) -> None:
    """Register the `BranchLayout` of packed sequences (branch / lo / hi [N, S]) under their
    tree mask `mask` (`model_walk.attach_branch_layout` says why and when).

    Raises:
        ValueError: a branch's prefix does not start at its window's first column.
    """
    if bool((lo[branch >= 0] != 0).any()):
        raise ValueError("Mamba branches need every prefix to start at its window's "
                         "first column")
    key = _mask_key(mask)
    _LAYOUTS[key] = BranchLayout.from_packed(branch, hi)
    weakref.finalize(mask, _LAYOUTS.pop, key, None)


def layout_of(mask: Tensor | None) -> BranchLayout | None:
    """The layout `register_layout` registered for `mask` (or a view of its storage)."""
    if mask is None or not _LAYOUTS:
        return None
    return _LAYOUTS.get(_mask_key(mask))


def _params(mixer):
    """(A [h], D, dt_bias [h], conv weight [dim, w], conv bias) as Megatron's mixer uses them."""
    cp = mixer.cp
    D = cp.get_D()
    if mixer.D_has_hdim:
        D = D.float().reshape(-1, mixer.headdim)
    return (-torch.exp(cp.get_A_log().float()), D, cp.get_dt_bias().float(),
            cp.get_conv1d_weight()[:, 0], cp.get_conv1d_bias())


def _split(mixer, zxBCdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[b, l, d] -> z [b, l, d_inner], xBC [b, l, conv_dim], dt [b, l, h] (local TP shard)."""
    cp = mixer.cp
    d_xbc = cp.d_inner_local_tpcp + 2 * cp.ngroups_local_tpcp * mixer.d_state
    return torch.split(zxBCdt, [cp.d_inner_local_tpcp, d_xbc, cp.nheads_local_tpcp], dim=-1)


def _heads(mixer, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Conv output [b, l, conv_dim] -> x [b, l, h, p], B and C [b, l, g, n]."""
    cp, n = mixer.cp, mixer.d_state
    x, B, C = torch.split(xBC, [cp.d_inner_local_tpcp, cp.ngroups_local_tpcp * n,
                                cp.ngroups_local_tpcp * n], dim=-1)
    b, length = xBC.shape[:2]
    return (x.reshape(b, length, -1, mixer.headdim), B.reshape(b, length, -1, n),
            C.reshape(b, length, -1, n))


def _inputs_before(xBC: Tensor, rows: Tensor, ends: Tensor, width: int) -> Tensor:
    """The `width` pre-conv inputs before column ends[k] of row rows[k]: [K, conv_dim, width],
    zeros before column 0 (as the conv's own left padding)."""
    padded = F.pad(xBC, (0, 0, width, 0))  # [b, width + l, conv_dim]
    cols = ends[:, None] + torch.arange(width, device=xBC.device)  # padded coordinates
    return padded[rows[:, None], cols].transpose(1, 2)


def _conv(mixer, xBC: Tensor, params, init: Tensor | None = None) -> Tensor:
    """Causal conv + activation of [b, l, conv_dim] pre-conv inputs, from `init` [b, conv_dim,
    w - 1] (zeros if None)."""
    _, _, _, weight, bias = params
    return ops.causal_conv1d_fn(xBC.transpose(1, 2), weight, bias, initial_states=init,
                                activation=mixer.activation).transpose(1, 2)


def _ssd(mixer, x: Tensor, B: Tensor, C: Tensor, dt: Tensor, z: Tensor, params,
         init: Tensor | None) -> Tensor:
    """SSD scan from `init` -> y [b, l, h, p] (z-gated when the mixer has no separate norm),
    as `MambaMixer._ssm_prefill` calls it (mamba_ssm's kernel where it imports)."""
    A, D, dt_bias, _, _ = params
    zh = None if mixer.rmsnorm else z.reshape(*z.shape[:2], -1, mixer.headdim).contiguous()
    return mm.mamba_chunk_scan_combined(
        x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), mixer.chunk_size,
        D=D, z=zh, dt_bias=dt_bias, initial_states=init, dt_softplus=True)


def packed_ssm(mixer, zxBCdt: Tensor, layout: BranchLayout) -> Tensor:
    """The mixer's SSM part on packed sequences: zxBCdt [S, N, d] (after `in_proj`) ->
    y [S, N, d_inner] (before `out_proj`); see the module docstring."""
    if mixer.cp.cp_size != 1:
        raise ValueError("packed branches in Mamba layers need context_parallel_size == 1")
    params = _params(mixer)
    zx = zxBCdt.transpose(0, 1)  # [N, S, d]
    n_seq, s = zx.shape[:2]
    z, xBC, dt = _split(mixer, zx)
    wl = int(layout.win_len.max())
    # Windows: columns [0, wl); a shorter window's extra columns come after all its branches'
    # prefix ends, so they change no state and their outputs are dropped.
    x_w, B_w, C_w = _heads(mixer, _conv(mixer, xBC[:, :wl], params))
    y_win = _ssd(mixer, x_w, B_w, C_w, dt[:, :wl], z[:, :wl], params, None)
    A, _, dt_bias, weight, _ = params
    ssm_init = ops.ssd_states_at(x_w, dt[:, :wl], A, B_w, layout.br_seq, layout.br_end,
                                 scan_chunk(mixer.chunk_size, x_w), dt_bias=dt_bias,
                                 dt_softplus=True)
    conv_init = _inputs_before(xBC[:, :wl], layout.br_seq, layout.br_end, weight.shape[1] - 1)
    # Branches: one batch of R rows, right-padded (padding comes after a branch's tokens).
    seq, cols = layout.br_seq[:, None], layout.br_cols
    x_b, B_b, C_b = _heads(mixer, _conv(mixer, xBC[seq, cols], params, conv_init))
    y_br = _ssd(mixer, x_b, B_b, C_b, dt[seq, cols], z[seq, cols], params,
                ssm_init)

    # Back in packed order; padding columns stay zero.
    flat = y_win.new_zeros(n_seq * s, *y_win.shape[2:])
    win_cols = torch.arange(wl, device=zx.device)
    win_idx = (torch.arange(n_seq, device=zx.device)[:, None] * s + win_cols)
    win_keep = win_cols[None] < layout.win_len[:, None]
    br_idx = seq * s + cols
    flat = flat.index_put((win_idx[win_keep],), y_win[win_keep])
    flat = flat.index_put((br_idx[layout.br_valid],), y_br[layout.br_valid])
    y = flat.view(n_seq, s, -1).transpose(0, 1)  # [S, N, d_inner]
    if mixer.rmsnorm:
        y = mixer.norm(y, z.transpose(0, 1))
    return y


@torch.no_grad()
def states_at(mixer, zxBCdt: Tensor, rows: Tensor, ends: Tensor, like: MambaState
              ) -> MambaState:
    """Cache entry of the contexts (rows[b], ends[b]) after a window prefill: zxBCdt
    [S, D, d] (after `in_proj` and the padding mask) -> `MambaState` with B rows, dtypes of
    `like` (the window rows' entry)."""
    params = _params(mixer)
    A, _, dt_bias, _, _ = params
    _, xBC, dt = _split(mixer, zxBCdt.transpose(0, 1))
    x, B, _ = _heads(mixer, _conv(mixer, xBC, params))
    ssm = ops.ssd_states_at(x, dt, A, B, rows, ends, scan_chunk(mixer.chunk_size, x),
                            dt_bias=dt_bias, dt_softplus=True)  # [B, h, p, n]
    conv = _inputs_before(xBC, rows, ends, like.conv.shape[-1])  # [B, conv_dim, d_conv]
    return MambaState(conv.transpose(0, 1).to(like.conv.dtype).contiguous(),
                      ssm.transpose(0, 1).to(like.ssm.dtype).contiguous())
