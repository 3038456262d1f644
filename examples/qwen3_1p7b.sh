#!/usr/bin/env bash
# RLP on Qwen3-1.7B-Base (dense, 1.72 B parameters), sized for the paper's 32 x H100 80GB
# (4 nodes x 8 GPUs). Runs torchrun for one node; on SLURM:
#   MODEL=qwen3_1p7b DATA=... sbatch examples/slurm/rlp_multinode.sbatch
#
# Layout  TP=1 PP=1 DP=32, distributed optimizer, bf16 parameters, fp32 EMA teacher.
# Batch   the paper's: 512 contexts/step (16 per rank, 8 per document window), G=16
#         thoughts of up to 2048 tokens after full 2048-token prefixes (a document's 8
#         positions lie within 512 tokens and share one window of up to 2559 tokens;
#         README "Full prefixes"), sampled in 2
#         chunks of 8 contexts (128 rows); the update runs 256 micro-batches of 1 sequence
#         per rank. lr 1e-6 constant, temperature 0.7, tau 0.999 (paper).
# Memory  per rank, GiB (tools/estimate_memory.py, printed at launch; the prefill's unfused
#         attention as the local Megatron spec runs it; the update's FlexAttention keeps no
#         scores):
#           persistent 16.6 = params 3.2 + grads 6.4 + Adam 0.6 + EMA teacher 6.4
#           rollout    30.7 = KV cache 30.2 (cascade decode: 8 prefixes x 2560 tokens +
#                             128 rows x 2049 thought tokens, x 28 layers) + 0.5
#           scoring     1.8   update 13.3 (activations 8.7, logits 4.6)
#           peak       51.3 of 80  (simulated on fake CUDA: 47.6 without the 4 GiB overhead,
#                      update 33.9; docs/simulated_cuda.md)
# Why chunks: the KV cache per rank does not shrink with TP (TP halves the heads, DP
# halves, rows per rank double), and all 256 rows at once would need 60 GiB of it (each
# prefix stored once, docs/performance.md "Cascade decode"; 126 GiB with the prefix
# copied per row). ROLLOUT_CHUNK=0 samples them in one pass: 81.9 GiB, does not fit (G=4
# fits that way: 39.9 GiB).
#
# Environment (required): DATA (.jsonl/.txt or indexed-dataset prefix), TOKENIZER
# (tokenizer.json or its folder), SAVE_DIR (checkpoints, metrics.jsonl, tensorboard/; a
# SAVE_DIR with a checkpoint is resumed), LOAD (the base model's Megatron checkpoint:
# `python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF_MODEL --out DIR ...`).
# Optional: CONFIG (the model config), NNODES (SLURM's, else 1), GPUS_PER_NODE (8), TP
# (1), CONTEXTS (512), GROUP_SIZE (16), ROLLOUT_CHUNK (8 contexts), THOUGHT_TOKENS (2048),
# PREFIX_TOKENS (2048),
# MICRO_BATCH (1), STEPS (500), SAVE_INTERVAL (25), WANDB_PROJECT, ESTIMATE=0 (skip the
# estimate), DRY_RUN=1 (print only).
# Extra arguments are `section.key=value` overrides, applied last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=examples/slurm/common.sh
source examples/slurm/common.sh

rlp_paper_recipe examples/configs/qwen3_1p7b.yaml 1 16 8 "$@"
