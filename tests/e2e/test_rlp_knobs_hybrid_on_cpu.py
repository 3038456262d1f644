"""The issue-12 knobs on a hybrid (Mamba + attention) model: with the thought template's
forced tokens, the KL to the frozen reference and the NTP mix all on, the per-context rollout
and unpacked update give the shared-prefix / packed step's thoughts, loss and gradients.
The frozen reference scores the packed micro-batches too, so its Mamba layers must start each
branch from the state at its t_k, as the policy's do (`models.mamba.branches`)."""

from __future__ import annotations

import pytest
from test_rlp_knobs_on_cpu import (  # noqa: F401  (step1 is a fixture)
    step1,
    test_all_knobs_per_context_path_equals_shared_prefix_path,
)

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.train.builder import build_state

TINY = (
    "model.hybrid_layer_pattern=M*-M-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_sequence_length=192",
    "model.mamba_num_heads=4", "model.mamba_head_dim=32", "model.mamba_state_dim=16",
    "model.mamba_num_groups=2",
    "rlp.contexts_per_step=4", "rlp.group_size=3", "rlp.max_thought_tokens=4",
    "rlp.positions_per_document=2", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32",
    "rlp.kl_coef=0.5", "optimizer.lr=1e-2", "train.seed=7", "data.split=90,10,0",
    "train.eval_contexts=4",
)


@pytest.fixture(scope="module")
def state():
    cfg = load_config("examples/configs/tiny_hybrid_cpu.yaml", TINY, world_size=1)
    distributed.initialize(cfg)
    yield build_state(cfg)
    distributed.shutdown()
