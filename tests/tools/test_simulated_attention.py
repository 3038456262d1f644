"""tools/simulated_attention.py: the fused-attention stand-in of the simulated GPU step.

On fake CUDA tensors, the packed update's FlexAttention path (`packing.flex`, its compiled
kernel replaced by the stand-in) keeps for backward exactly q, k, v, the output and an fp32
log-sum-exp, while the split path's plain ops keep the branch scores; a dtype or a device
mismatch fed to it fails with one line. The whole simulated step with it:
tests/tools/test_simulate_gpu.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers.fresh_process import cuda_is_mapped_to_cpu, rerun_in_fresh_process

ROOT = Path(__file__).resolve().parents[2]
W, K, T, HEADS, GROUPS, HD = 256, 2, 128, 4, 2, 64  # window, branches x tokens, layout
S = W + K * T


def _fresh_process(name: str) -> bool:
    """Rerun test `name` in a fresh process when an earlier test mapped cuda to the CPU
    (`backends.cpu`); True when it did (the caller returns)."""
    if not cuda_is_mapped_to_cpu():
        return False
    rerun_in_fresh_process(__file__, name)
    return True


def _simulated():
    """FakeTensorMode + host value shadows + the stand-in, as `simulate_gpu` stacks them."""
    import contextlib

    sys.path.insert(0, str(ROOT / "tools"))
    from simulated_attention import fused_attention
    from simulated_values import HostValues, Oracle
    from torch._subclasses.fake_tensor import FakeTensorMode

    stack = contextlib.ExitStack()
    stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
    stack.enter_context(HostValues(Oracle()))
    stack.enter_context(fused_attention())
    return stack


def _tree():
    """One packed sequence: a W-token window, then K branches of T tokens, branch k reading
    the window's first W - 64 k columns ([B, S] branch, lo, hi as `packing.tree` makes)."""
    import torch

    from megatron_rlp.models.masks import WINDOW

    col = torch.arange(S)
    branch = torch.full((S,), WINDOW)
    lo = torch.zeros(S, dtype=torch.long)
    hi = col + 1
    for k in range(K):
        part = slice(W + k * T, W + (k + 1) * T)
        branch[part], hi[part] = k, W - 64 * k
    return branch[None], lo[None], hi[None]


def _qkv(dtype_k=None, device_v="cuda"):
    import torch

    q = torch.randn(S, 1, HEADS, HD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(S, 1, GROUPS, HD, device="cuda", dtype=dtype_k or torch.bfloat16,
                    requires_grad=True)
    v = torch.randn(S, 1, GROUPS, HD, device=device_v, dtype=torch.bfloat16,
                    requires_grad=True)
    return q, k, v


def _kept_bytes(fn) -> tuple[int, list]:
    """Bytes of the distinct storages `fn()` saves for backward, and the saved tensors."""
    import torch

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    storages = {}
    for t in saved:
        storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(storages.values()), saved


def test_flex_path_keeps_q_k_v_out_and_lse_only_and_the_split_path_keeps_scores():
    if _fresh_process("test_flex_path_keeps_q_k_v_out_and_lse_only_and_the_split_path_"
                      "keeps_scores"):
        return
    import torch

    from megatron_rlp.packing import split_attention
    from megatron_rlp.packing.flex import flex_tree_attention, tree_descriptors

    with _simulated():
        branch, lo, hi = (t.to("cuda") for t in _tree())
        q, k, v = _qkv()
        flex_bytes, saved = _kept_bytes(lambda: flex_tree_attention(
            q, k, v, tree_descriptors(branch, lo, hi), 0.125))
        # the stand-in's saved tensors: q, k, v in FlexAttention's [B, h, S, hn], out, lse
        assert [tuple(t.shape) for t in saved] == [(1, HEADS, S, HD), (1, GROUPS, S, HD),
                                                   (1, GROUPS, S, HD), (1, HEADS, S, HD),
                                                   (1, HEADS, S)]
        assert [t.dtype for t in saved] == [torch.bfloat16] * 4 + [torch.float32]
        assert all(t.device.type == "cuda" for t in saved)
        qkv_out = 2 * S * HD * (2 * HEADS + 2 * GROUPS)
        assert flex_bytes == qkv_out + 4 * HEADS * S  # + the fp32 log-sum-exp
        layout = split_attention.SplitLayout.from_packed(branch, lo, hi)
        split_bytes, _ = _kept_bytes(lambda: split_attention.split_tree_attention(
            q, k, v, layout, 0.125))
    # the split path keeps each branch's fp32 softmax output and its bf16 copy over W + T keys
    probs = HEADS * K * T * (W + T) * (4 + 2)
    assert split_bytes - flex_bytes >= probs, (split_bytes, flex_bytes, probs)


def test_fused_attention_backward_gives_gradients_shaped_as_its_inputs():
    """dq, dk, dv as q, k, v (GQA: k, v keep their groups); backward FLOPs 2.5 x forward."""
    if _fresh_process("test_fused_attention_backward_gives_gradients_shaped_as_its_inputs"):
        return
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "tools"))
    from simulated_attention import FusedAttention

    counter = FlopCounterMode(display=False)
    with _simulated(), counter:
        q, k, v = (t.permute(1, 2, 0, 3) for t in _qkv())
        out, lse = FusedAttention.apply(q, k, v, 1000)
        forward = counter.get_total_flops()
        assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
        assert lse.shape == q.shape[:-1]
        dq, dk, dv, none = out.grad_fn.apply(torch.ones_like(out), None)
        assert none is None
        for grad, like in ((dq, q), (dk, k), (dv, v)):
            assert grad.shape == like.shape and grad.dtype == like.dtype
            assert grad.device == like.device
    assert forward == 4 * 1000 * HEADS * HD
    assert counter.get_total_flops() == forward * 7 // 2  # + 2.5 x forward


def test_fused_attention_counts_the_pairs_the_tree_reads():
    """FLOPs: 4 x head_dim x heads per pair read forward, 2.5 x that backward (FlashAttention's
    accounting); pairs from the descriptor's values (window causal + each branch's prefix
    and its own causal triangle), not S x S."""
    if _fresh_process("test_fused_attention_counts_the_pairs_the_tree_reads"):
        return
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_rlp.packing.flex import flex_tree_attention, tree_descriptors

    branch, lo, hi = _tree()
    pairs = int((hi - lo).sum()) + K * T * (T + 1) // 2  # prefix columns + own causal
    sys.path.insert(0, str(ROOT / "tools"))
    import simulated_attention  # noqa: F401 the FLOP formulas, before the counter is built

    counter = FlopCounterMode(display=False)
    with _simulated(), counter:
        q, k, v = _qkv()
        out = flex_tree_attention(q, k, v, tree_descriptors(*(t.to("cuda") for t in
                                                              (branch, lo, hi))), 0.125)
        forward = counter.get_total_flops()
    assert out.shape == (S, 1, HEADS * HD)
    assert forward == 4 * pairs * HEADS * HD
    assert pairs < S * S // 2


@pytest.mark.parametrize("planted", ["dtype", "device"])
def test_a_planted_mismatch_into_the_stand_in_fails_with_one_line(planted):
    if _fresh_process(f"test_a_planted_mismatch_into_the_stand_in_fails_with_one_line"
                      f"[{planted}]"):
        return
    import torch

    from megatron_rlp.packing.flex import flex_tree_attention, tree_descriptors

    sys.path.insert(0, str(ROOT / "tools"))
    from simulated_values import SimulationError

    with _simulated():
        branch, lo, hi = (t.to("cuda") for t in _tree())
        if planted == "dtype":
            q, k, v = _qkv(dtype_k=torch.float32)
        else:
            q, k, v = _qkv(device_v="cpu")
        with pytest.raises(SimulationError) as error:
            flex_tree_attention(q, k, v, tree_descriptors(branch, lo, hi), 0.125)
    line = str(error.value)
    assert "\n" not in line
    assert "flex.py" in line, line  # the caller's file:line
    assert ("float32" in line and "bfloat16" in line) if planted == "dtype" else "cpu" in line
