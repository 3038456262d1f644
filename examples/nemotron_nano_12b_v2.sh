#!/usr/bin/env bash
# RLP on NVIDIA-Nemotron-Nano-12B-v2-Base (hybrid Mamba-2/attention, 12.31 B parameters,
# 62 layers: 28 Mamba-2, 6 attention, 28 MLP), sized for the paper's 32 x H100 80GB
# (4 nodes x 8 GPUs). Runs torchrun for one node; on SLURM:
#   MODEL=nemotron_nano_12b_v2 DATA=... sbatch examples/slurm/rlp_multinode.sbatch
#
# Layout  TP=8 (one node) PP=1 DP=4, distributed optimizer, bf16 parameters, fp32 EMA
#         teacher. TP=8 splits the 40 heads / 8 KV groups / 128 Mamba heads / 8 groups evenly.
# Batch   the paper's: 512 contexts/step (128 per rank, 8 per document window), G=16
#         thoughts of up to 2048 tokens after full 2048-token prefixes (a document's 8
#         positions lie within 512 tokens and share one window of up to 2559 tokens;
#         README "Full prefixes"), sampled in 2
#         chunks of 64 contexts (1024 rows); the update runs 2048 micro-batches of 1
#         sequence per rank. lr 1e-6 constant, temperature 0.7, tau 0.999 (paper).
# Memory  per rank, GiB (tools/estimate_memory.py, printed at launch; unfused attention as
#         the local Megatron spec runs it today):
#           persistent 18.6 = params 2.9 + grads 5.7 + Adam 4.3 + EMA teacher 5.7
#           rollout    26.2 = KV cache 6.5 (6 attention layers; cascade decode: each
#                             prefix once) + SSM/conv state 18.0 (28 Mamba layers, fp32)
#                             + prefill 1.7 (attention scores of 8 windows x 2560 tokens)
#           scoring     6.5   update 15.1
#           peak       48.8 of 80  (with flash attention 48.8)
# Why chunks: all 2048 rows in one pass would peak at 75.1 GiB (ROLLOUT_CHUNK=0 does that,
# under 10% slack; with G=8, 50.8).
#
# Environment (required): DATA (.jsonl/.txt or indexed-dataset prefix), TOKENIZER
# (tokenizer.json or its folder), SAVE_DIR (checkpoints, metrics.jsonl, tensorboard/; a
# SAVE_DIR with a checkpoint is resumed), LOAD (the base model's Megatron checkpoint:
# `python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF_MODEL --out DIR ...`).
# Optional: CONFIG (the model config), NNODES (SLURM's, else 1), GPUS_PER_NODE (8), TP
# (8), CONTEXTS (512), GROUP_SIZE (16), ROLLOUT_CHUNK (64 contexts), THOUGHT_TOKENS
# (2048), PREFIX_TOKENS (2048),
# MICRO_BATCH (1), STEPS (500), SAVE_INTERVAL (25), WANDB_PROJECT, ESTIMATE=0 (skip the
# estimate), DRY_RUN=1 (print only).
# Extra arguments are `section.key=value` overrides, applied last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=examples/slurm/common.sh
source examples/slurm/common.sh

rlp_paper_recipe examples/configs/nemotron_nano_12b_v2.yaml 8 16 64 "$@"
