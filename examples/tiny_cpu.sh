#!/usr/bin/env bash
# RLP on the tiny model (~3M parameters, byte tokenizer, the shipped corpus) on CPU:
# 2 ranks, data parallel (TP=1 PP=1 DP=2), torchrun --standalone, gloo. No GPU, no paths.
#
#   bash examples/tiny_cpu.sh                                  # 20 RLP steps
#   bash examples/tiny_cpu.sh train.steps=5 rlp.group_size=8   # extra args are overrides
#   sbatch examples/slurm/tiny_cpu.sbatch train.steps=5        # the same as a SLURM job
#
# Batch: 8 contexts/step (4 per rank) x G=4 thoughts of up to 16 tokens, prefixes of up to
# 128 tokens. Memory (tools/estimate_memory.py --config examples/configs/tiny_cpu.yaml
# --world-size 2): ~0.3 GiB per rank, the update's activations the largest part.
#
# Environment (all optional):
#   RUN_DIR    output folder: metrics.jsonl, tensorboard/ (runs/tiny_cpu/<job id or time>)
#   NPROC      ranks (2)
#   DATA       corpus: .jsonl/.txt or an indexed-dataset prefix (data/corpus.jsonl)
#   TOKENIZER  "byte" or a tokenizer.json (byte)
#   SAVE_DIR   save checkpoints there (off)
#   LOAD       start from this checkpoint, e.g. a `make demo` warm-up: runs/demo/ntp (off)
#   DRY_RUN=1  print the torchrun command instead of running it
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=examples/slurm/common.sh
source examples/slurm/common.sh

CONFIG=examples/configs/tiny_cpu.yaml
RUN_DIR=${RUN_DIR:-runs/tiny_cpu/${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}
export NNODES=1 NPROC_PER_NODE=${NPROC:-2}
unset MASTER_ADDR  # one node: torchrun --standalone picks a free port

overrides=(
  device.type=cpu
  data.corpus="${DATA:-data/corpus.jsonl}"
  data.tokenizer="${TOKENIZER:-byte}"
  train.metrics_file="$RUN_DIR/metrics.jsonl"
  train.tensorboard_dir="$RUN_DIR/tensorboard"
)
if [[ -n "${SAVE_DIR:-}" ]]; then
  overrides+=(train.save="$SAVE_DIR")
fi
if [[ -n "${LOAD:-}" ]]; then
  rlp_require_file "$LOAD" "LOAD must be a checkpoint directory"
  overrides+=(train.load="$LOAD")
fi

rlp_torchrun_args
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  echo "[tiny_cpu] $NPROC_PER_NODE ranks on CPU; metrics: $RUN_DIR/metrics.jsonl"
fi
rlp_launch "${RLP_TORCHRUN[@]}" pretrain_rlp.py --config "$CONFIG" "${overrides[@]}" "$@"
