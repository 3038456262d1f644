#!/usr/bin/env bash
# RLP on the tiny hybrid (~3M parameters, Nemotron-H style: pattern M-M*-M- = Mamba-2, MLP,
# attention; squared-ReLU MLP, no position embedding; byte tokenizer, the shipped corpus) on
# CPU: 2 ranks, data parallel, torchrun --standalone, gloo. No GPU, no paths. Megatron's own
# MambaMixer runs on the pure-torch Mamba-2 kernels (megatron_rlp/models/mamba/).
#
#   bash examples/tiny_hybrid_cpu.sh                                 # 20 RLP steps
#   bash examples/tiny_hybrid_cpu.sh train.steps=5                   # extra args: overrides
#   bash examples/tiny_hybrid_cpu.sh parallel.tensor_model_parallel_size=2   # TP=2 instead
#
# Batch: 8 contexts/step (4 per rank) x G=4 thoughts of up to 16 tokens, prefixes of up to
# 128 tokens; each context's prefill state (KV cache and Mamba conv/SSM state) is forked
# to its 4 thoughts.
#
# Environment (all optional):
#   RUN_DIR    output folder: metrics.jsonl (runs/tiny_hybrid_cpu/<time>)
#   NPROC      ranks (2)
#   DRY_RUN=1  print the torchrun command instead of running it
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=examples/slurm/common.sh
source examples/slurm/common.sh

CONFIG=examples/configs/tiny_hybrid_cpu.yaml
RUN_DIR=${RUN_DIR:-runs/tiny_hybrid_cpu/$(date +%Y%m%d-%H%M%S)}
export NNODES=1 NPROC_PER_NODE=${NPROC:-2}
unset MASTER_ADDR  # one node: torchrun --standalone picks a free port

rlp_torchrun_args
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  echo "[tiny_hybrid_cpu] $NPROC_PER_NODE ranks on CPU; metrics: $RUN_DIR/metrics.jsonl"
fi
rlp_launch "${RLP_TORCHRUN[@]}" pretrain_rlp.py --config "$CONFIG" device.type=cpu \
  train.metrics_file="$RUN_DIR/metrics.jsonl" "$@"
