"""One device: an RLP step creates its tensors on the configured device (`TrainState.device`,
from `distributed.torch_device(cfg)`), never on an implicit default.

What runs here: a bf16 hybrid step (attention, Mamba, MLP; entropy-placed contexts, so the
teacher's entropy forward runs too) under a `TorchFunctionMode` that (1) records every tensor
factory (`torch.zeros`, `arange`, `full`, `tensor`, ...) called from megatron_rlp code without
an explicit `device=`, and (2) checks the device of every tensor any torch function returns.
On a CUDA run an implicit-device factory would put that tensor on the CPU; (1) catches those
on the CPU too. The allowed exceptions build host-side batches from numpy documents on
purpose and move them in one copy per step (listed below with where they move).

What this cannot show without a GPU: (2) is trivially true when the configured device is the
CPU, and Megatron-internal allocations are not audited (Megatron places those with
`torch.cuda.current_device()`, which `distributed.setup_device` sets to the same device).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import megatron_rlp
from megatron_rlp import distributed
from megatron_rlp.train.rlp_step import rlp_step
from megatron_rlp.train.samplers import make_context_sampler
from megatron_rlp.train.timers import PhaseTimer

PKG = str(Path(megatron_rlp.__file__).resolve().parent)
FACTORIES = {"empty", "zeros", "ones", "full", "arange", "tensor", "as_tensor", "rand", "randn",
             "randint", "randperm", "eye", "linspace", "empty_strided"}
# Host-side by design: built from numpy documents / python lists, then moved with one copy
# per tensor per step (build_rlp_inputs -> `_to(..., device)`, update_batch -> `.to(device)`).
HOST_BUILDERS = {"left_pad", "build_rlp_inputs", "update_batch"}


class DeviceAudit(TorchFunctionMode):
    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.implicit: set[tuple[str, str, int]] = set()
        self.elsewhere: set[str] = set()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and kwargs.get("device") is None:
            caller = _first_caller_outside_torch()
            if caller is not None and caller.f_code.co_name not in HOST_BUILDERS:
                self.implicit.add((name, caller.f_code.co_filename[len(PKG) + 1:],
                                   caller.f_lineno))
        # backends.cpu wraps some torch functions; call what they wrap, or the wrapper would
        # run twice (once by the caller, once here).
        out = getattr(func, "__wrapped__", func)(*args, **kwargs)
        self.calls += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.elsewhere.add(f"{name}: {t.device}")
        return out


def _first_caller_outside_torch():
    """The frame that called into torch, if it is megatron_rlp code (not its CPU backend)."""
    f = sys._getframe(2)
    while f is not None and ("/torch/" in f.f_code.co_filename
                             or f.f_code.co_filename.endswith("backends/cpu.py")):
        f = f.f_back
    if f is None or not f.f_code.co_filename.startswith(PKG):
        return None
    return f


TINY = (  # the `state` fixture's overrides (tests/conftest.py)
    "model.hybrid_layer_pattern=M*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=64",
    "model.mamba_num_heads=4", "model.mamba_head_dim=16", "model.mamba_state_dim=8",
    "model.mamba_num_groups=2", "rlp.contexts_per_step=4", "rlp.group_size=3",
    "rlp.max_thought_tokens=4", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32",
    "rlp.position_strategy=entropy", "precision.params_dtype=bf16")


def test_step_creates_tensors_on_the_configured_device(state):
    assert state.device == distributed.torch_device(state.cfg) == torch.device("cpu")
    assert all(p.device == state.device for p in state.policy.parameters())
    assert all(p.device == state.device for p in state.teacher.model.parameters())
    audit = DeviceAudit(state.device)
    with audit:
        metrics = rlp_step(state, make_context_sampler(state), PhaseTimer())
    assert metrics["skipped"] == 0.0 and audit.calls > 1000  # the step really ran audited
    assert not audit.implicit, f"tensors created without device=: {sorted(audit.implicit)}"
    assert not audit.elsewhere, sorted(audit.elsewhere)
