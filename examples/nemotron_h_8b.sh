#!/usr/bin/env bash
# RLP on Nemotron-H-8B-Base-8K (hybrid Mamba-2/attention, 8.10 B parameters, 52 layers:
# 24 Mamba-2, 4 attention, 24 MLP), sized for the paper's 32 x H100 80GB
# (4 nodes x 8 GPUs). Runs torchrun for one node; on SLURM:
#   MODEL=nemotron_h_8b DATA=... sbatch examples/slurm/rlp_multinode.sbatch
#
# Layout  TP=4 PP=1 DP=8, distributed optimizer, bf16 parameters, fp32 EMA teacher.
# Batch   the paper's: 512 contexts/step (64 per rank, 8 per document window), G=16
#         thoughts of up to 2048 tokens after full 2048-token prefixes (a document's 8
#         positions lie within 512 tokens and share one window of up to 2559 tokens;
#         README "Full prefixes"), sampled in 2
#         chunks of 32 contexts (512 rows); the update runs 1024 micro-batches of 1
#         sequence per rank. lr 1e-6 constant, temperature 0.7, tau 0.999.
# Memory  per rank, GiB (tools/estimate_memory.py, printed at launch; unfused attention as
#         the local Megatron spec runs it today):
#           persistent 21.7 = params 3.8 + grads 7.5 + Adam 2.8 + EMA teacher 7.5
#           rollout    17.7 = KV cache 4.3 (4 attention layers; cascade decode: each
#                             prefix once) + SSM/conv state 12.4 (24 Mamba layers, fp32)
#                             + prefill 1.1 (one window per document)
#           scoring     4.3   update 17.3
#           peak       43.4 of 80  (with flash attention 43.2); TP=8 26.8, TP=2 79.8 (no slack)
# Why chunks: all 1024 rows in one pass would peak at 61.2 GiB (ROLLOUT_CHUNK=0 does that;
# 85.4 with the prefix copied per row), inside 80; the fp32 Mamba decode state doubles
# its share.
#
# Environment (required): DATA (.jsonl/.txt or indexed-dataset prefix), TOKENIZER
# (tokenizer.json or its folder), SAVE_DIR (checkpoints, metrics.jsonl, tensorboard/; a
# SAVE_DIR with a checkpoint is resumed), LOAD (the base model's Megatron checkpoint:
# `python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF_MODEL --out DIR ...`).
# Optional: CONFIG (the model config), NNODES (SLURM's, else 1), GPUS_PER_NODE (8), TP
# (4), CONTEXTS (512), GROUP_SIZE (16), ROLLOUT_CHUNK (32; 0: all of a rank's contexts at once),
# THOUGHT_TOKENS (2048), PREFIX_TOKENS (2048),
# MICRO_BATCH (1), STEPS (500), SAVE_INTERVAL (25), WANDB_PROJECT, ESTIMATE=0 (skip the
# estimate), DRY_RUN=1 (print only).
# Extra arguments are `section.key=value` overrides, applied last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=examples/slurm/common.sh
source examples/slurm/common.sh

rlp_paper_recipe examples/configs/nemotron_h_8b.yaml 4 16 32 "$@"
