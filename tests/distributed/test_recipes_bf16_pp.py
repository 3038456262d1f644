"""The dense GPU recipe (examples/configs/qwen3_1p7b.yaml), shrunk, trains RLP steps in its own
bf16 under pipeline parallel 2 on the CPU (torchrun, gloo), through the real entry point:
bf16 activations cross the stage boundary (pipeline_dtype), the fp32 EMA teacher sends and
receives fp32 (its own config), the checkpoint is written. Shrinking as in
tests/e2e/test_recipes_bf16.py."""

from __future__ import annotations

import math

import torch
from layout_runs import train_and_collect

SHRUNK_QWEN3 = (
    "model.hybrid_layer_pattern=*-|*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16",
    "model.max_sequence_length=64", "model.make_vocab_size_divisible_by=64",
    "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
    "rlp.contexts_per_step=4", "rlp.positions_per_document=2", "rlp.group_size=3",
    "rlp.max_thought_tokens=4", "rlp.min_prefix_tokens=8", "rlp.max_prefix_tokens=32",
    "data.corpus=data/corpus.jsonl", "data.tokenizer=byte", "data.ntp_batch_size=4",
    "train.allow_random_init=true",  # a shrunk model: nothing pretrained to load
    "optimizer.lr=1e-3", "optimizer.min_lr=1e-3", "train.seed=3", "train.steps=2",
    "device.type=cpu", "device.num_threads=1",
)


def test_dense_recipe_trains_in_bf16_with_pipeline_parallel(tmp_path):
    rows, params = train_and_collect(tmp_path, 2, "examples/configs/qwen3_1p7b.yaml",
                                     *SHRUNK_QWEN3)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["skipped"] == 0.0
        for key in ("loss", "reward_mean", "s_ema", "s_pred", "grad_norm", "logp_diff_max"):
            assert math.isfinite(r[key]), (key, r)
        assert r["clip_fraction"] == 0.0  # exact on-policy ratio, also across stages
    assert 0.0 < rows[0]["logp_diff_max"] < 0.1
    # The checkpoint holds the policy in its own precision (the optimizer keeps fp32 mains).
    assert params and {v.dtype for v in params.values()} == {torch.bfloat16}
