"""The issue-12 knobs on a hybrid (Mamba + attention) model: with the thought template's
forced tokens, the KL to the frozen reference and the NTP mix all on, the per-context rollout
and unpacked update give the shared-prefix / packed step's thoughts, loss and gradients.
The frozen reference scores the packed micro-batches too, so its Mamba layers must start each
branch from the state at its t_k, as the policy's do (`models.mamba.branches`)."""

from __future__ import annotations

from test_rlp_knobs import TINY as DENSE
from test_rlp_knobs import (  # noqa: F401  (step1 is a fixture)
    step1,
    test_all_knobs_per_context_path_equals_shared_prefix_path,
)

# tests/conftest.py's `state` builds tiny_cpu.yaml with these (later overrides win)
TINY = DENSE + ("model.hybrid_layer_pattern=M*-M-", "model.mamba_num_heads=4",
                "model.mamba_head_dim=32", "model.mamba_state_dim=16", "model.mamba_num_groups=2")
