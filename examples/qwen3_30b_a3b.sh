#!/usr/bin/env bash
# RLP on Qwen3-30B-A3B-Base (mixture of experts: 48 blocks of attention + 128 experts, top-8;
# 30.5 B parameters, 3.35 B active per token), sized for 64 x H100 80GB (8 nodes x 8 GPUs).
# Runs torchrun for one node; on SLURM:
#   MODEL=qwen3_30b_a3b DATA=... sbatch --nodes 8 examples/slurm/rlp_multinode.sbatch
#
# Layout  EP=8 inside a node (a node's 8 ranks hold a layer's 128 experts, 16 each), PP=2
#         across nodes (stage 0 on nodes 0-3, stage 1 on nodes 4-7: the config's `|` cuts
#         the 48 blocks 24/24), TP=1, DP=32, distributed optimizer (expert Adam state over
#         DP / EP = 4 ranks), selective recomputation, bf16 parameters, fp32 EMA teacher.
# Batch   the paper's: 512 contexts/step (16 per data-parallel rank, 8 per document window),
#         G=16 thoughts of up to 2048 tokens after full 2048-token prefixes, sampled in 2
#         chunks of 8 contexts (128 rows); the update runs 256 micro-batches of 1 sequence
#         through the 2-stage pipeline. lr 1e-6 constant, temperature 0.7, tau 0.999.
# Memory  per rank, GiB (tools/estimate_memory.py, printed at launch; unfused attention as
#         the local Megatron spec runs it today):
#           persistent 29.4 = params 4.8 + grads 9.6 + Adam 5.3 + EMA teacher 9.6
#           rollout    13.8 = KV cache 12.9 (cascade decode, 24 attention layers per stage)
#                             + prefill 0.9 (one attention layer's scores, 1 window)
#           scoring     3.4   update 36.1 (activations 31.5: the 2 micro-batches 1F1B
#                             keeps in flight on stage 0, 15.7 each, ~3/4 of it the MoE
#                             layers; logits 4.6)
#           peak       69.5 of 80 (simulated on fake CUDA: 65.0 + 4 overhead, stage 0)
#         One rollout pass (ROLLOUT_CHUNK=16) would take its rollout phase to 27.6 (under
#         the update's); PP=1 does not fit (93.5: a whole replica's experts / 8).
# Routing agreement (`routing_agreement`) is logged only with PP=1 and no sequence parallel
# (docs/moe.md); exactness in fp32 is proven on the tiny MoE configs.
#
# Environment (required): DATA (.jsonl/.txt or indexed-dataset prefix), TOKENIZER
# (tokenizer.json or its folder), SAVE_DIR (checkpoints, metrics.jsonl, tensorboard/; a
# SAVE_DIR with a checkpoint is resumed), LOAD (the base model's Megatron checkpoint:
# `python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF_MODEL --out DIR ...`).
# Optional: CONFIG (the model config), NNODES (SLURM's, else 1), GPUS_PER_NODE (8), TP
# (1; > 1 turns on sequence parallel), PP (2; the config's pattern has 2 stages), EP (8),
# CONTEXTS (512), GROUP_SIZE (16), ROLLOUT_CHUNK (8 contexts), THOUGHT_TOKENS (2048),
# PREFIX_TOKENS (2048), MICRO_BATCH (1), STEPS (500), SAVE_INTERVAL (25), WANDB_PROJECT,
# RECIPE_GPUS (64), ESTIMATE=0 (skip the estimate), DRY_RUN=1 (print only).
# Extra arguments are `section.key=value` overrides, applied last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=examples/slurm/common.sh
source examples/slurm/common.sh

export PP=${PP:-2}
RECIPE_GPUS=${RECIPE_GPUS:-64}  # 8 nodes x 8: fewer prints what changes per rank
sp=false
[[ "${TP:-1}" == 1 ]] || sp=true  # Megatron's MoE layer needs sequence parallel with TP > 1
rlp_paper_recipe examples/configs/qwen3_30b_a3b.yaml 1 16 8 \
  parallel.expert_model_parallel_size="${EP:-8}" parallel.sequence_parallel="$sp" "$@"
