# shellcheck shell=bash
# Helpers shared by the launch scripts (examples/*.sh) and the SLURM batch scripts
# (examples/slurm/*.sbatch). Source it from the repository root; it only defines functions.
#
#   rlp_require VAR "what it is" [VAR "what it is" ...]   exit 2 naming every unset VAR
#   rlp_require_file PATH "hint"                          exit 2 when PATH is missing
#   rlp_require_run_paths      DATA TOKENIZER SAVE_DIR LOAD checked; sets RLP_LOAD
#   rlp_load_or_resume SAVE_DIR LOAD                      SAVE_DIR when it has a checkpoint
#   rlp_torchrun_args                                     fills RLP_TORCHRUN (an array)
#   rlp_estimate CONFIG WORLD OVERRIDES...                print the per-rank memory estimate
#   rlp_launch COMMAND...      print, then `rlp_run workers` (DRY_RUN=1: print only)
#   rlp_paper_recipe CONFIG TP G CHUNK [OVERRIDES...]  the paper's RLP settings on GPUs, launched
#   rlp_fewer_gpus_note WORLD RECIPE_GPUS CONTEXTS DP G CHUNK  what a smaller launch changes
#   rlp_run {workers|self} COMMAND...                     run COMMAND, forward signals
#
# Signals. SLURM sends `--signal=B:USR1@120` to the batch shell only, and SIGTERM at the
# time limit or on `scancel`. `rlp_run self srun ...` (batch level) forwards USR1/TERM to
# srun, which relays them to every process of the job step on every node. On each node
# `rlp_run workers torchrun ...` starts torchrun with USR1 ignored (its default action
# would kill the agent while the trainers save) and forwards USR1/TERM to the trainers
# themselves, which torchrun starts in their own sessions. Depending on the cluster's
# proctrack plugin a trainer may see the signal twice (slurmstepd and this shell): the
# trainer's handler only sets a "save and stop" flag, so that is harmless.

# Exit 2 listing every variable in the (name, description) pairs that is unset or empty.
rlp_require() {
  local missing=() name
  while (($# >= 2)); do
    name=$1
    if [[ -z "${!name:-}" ]]; then
      echo "error: $name is not set: $2" >&2
      missing+=("$name=...")
    fi
    shift 2
  done
  if ((${#missing[@]})); then
    echo "       (set it in the environment: ${missing[*]} bash ${0##*/} ...)" >&2
    exit 2
  fi
}

# Exit 2 when a file or directory is missing.
rlp_require_file() {
  if [[ ! -e "$1" ]]; then
    echo "error: $1 does not exist${2:+: $2}" >&2
    exit 2
  fi
}

# The torchrun executable: $TORCHRUN, else the repository's .venv, else torchrun on PATH.
rlp_torchrun_bin() {
  if [[ -n "${TORCHRUN:-}" ]]; then
    echo "$TORCHRUN"
  elif [[ -x .venv/bin/torchrun ]]; then
    echo .venv/bin/torchrun
  elif command -v torchrun >/dev/null 2>&1; then
    command -v torchrun
  else
    echo "error: torchrun not found (run 'make venv', use the container, or set TORCHRUN)" >&2
    return 2
  fi
}

# RLP_TORCHRUN=(torchrun + rendezvous flags) from the environment:
#   NNODES (default: SLURM_JOB_NUM_NODES, else 1), NPROC_PER_NODE (default: GPUS_PER_NODE,
#   else 1), MASTER_ADDR / MASTER_PORT (the first node; needed when NNODES > 1),
#   RDZV_ID (default: SLURM_JOB_ID). One node without MASTER_ADDR runs --standalone.
rlp_torchrun_args() {
  local bin nnodes nproc
  bin=$(rlp_torchrun_bin) || exit 2
  nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
  nproc=${NPROC_PER_NODE:-${GPUS_PER_NODE:-1}}
  RLP_TORCHRUN=("$bin" --nproc-per-node "$nproc")
  if [[ "$nnodes" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    RLP_TORCHRUN+=(--standalone)
  else
    rlp_require MASTER_ADDR "the first node's address (the sbatch scripts set it)"
    RLP_TORCHRUN+=(--nnodes "$nnodes" --rdzv-backend c10d
      --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
      --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-rlp}}")
  fi
}

# Resume from SAVE_DIR when it holds a checkpoint (a requeued or continued job), else LOAD.
rlp_load_or_resume() {
  if [[ -e "$1/latest" ]]; then
    echo "$1"
  else
    echo "$2"
  fi
}

# Child pids of $1, from /proc (no procps needed).
_rlp_children() {
  local stat rest f ppid
  for f in /proc/[0-9]*/stat; do
    { stat=$(<"$f"); } 2>/dev/null || continue
    rest=${stat##*) }  # fields after "pid (comm) "
    read -r _ ppid _ <<<"$rest"
    if [[ "$ppid" == "$1" ]]; then
      f=${f#/proc/}
      echo "${f%/stat}"
    fi
  done
}

_rlp_forward() {
  local sig=$1 targets
  _RLP_SIGNALLED=1
  [[ "$sig" == INT ]] && sig=TERM
  targets=$_RLP_CHILD
  if [[ "$_RLP_MODE" == workers ]]; then
    targets=$(_rlp_children "$_RLP_CHILD" | tr '\n' ' ')
    if [[ -z "${targets// /}" ]]; then  # torchrun has no trainers yet (rendezvous)
      [[ "$sig" == USR1 ]] && { echo "[signal] SIGUSR1 before the trainers started" >&2; return; }
      targets=$_RLP_CHILD
    fi
  fi
  echo "[signal] ${HOSTNAME%%.*}: forwarding SIG$1 to ${targets% }" >&2
  # shellcheck disable=SC2086  # a list of pids
  kill -s "$sig" $targets 2>/dev/null || true
}

# rlp_run MODE COMMAND...: run COMMAND in the background and wait for it, forwarding
# SIGUSR1, SIGTERM and SIGINT (as SIGTERM). MODE "self": to COMMAND (srun). MODE "workers":
# COMMAND is torchrun; it ignores SIGUSR1, and the signals go to its children, the trainers.
# Returns COMMAND's exit status.
rlp_run() {
  _RLP_MODE=$1
  shift
  if [[ "$_RLP_MODE" == workers ]]; then
    trap '' USR1  # inherited by torchrun (and its trainers, until they install a handler)
  fi
  "$@" &
  _RLP_CHILD=$!
  trap '_rlp_forward USR1' USR1
  trap '_rlp_forward TERM' TERM
  trap '_rlp_forward INT' INT
  local status
  while :; do
    _RLP_SIGNALLED=0
    status=0
    wait "$_RLP_CHILD" || status=$?
    # `wait` returns early (128+n) when a trapped signal arrives: wait again for the real end.
    [[ "$_RLP_SIGNALLED" == 1 ]] || break
  done
  trap - USR1 TERM INT
  return "$status"
}

# Exit 2 unless DATA is a .jsonl/.txt file or an indexed-dataset prefix (PREFIX.idx).
rlp_require_data() {
  if [[ ! -f "$1" && ! -f "$1.idx" ]]; then
    echo "error: DATA=$1 is neither a file nor an indexed-dataset prefix (no $1.idx)" >&2
    exit 2
  fi
}

# The four paths of a real run, from the environment; sets RLP_LOAD (SAVE_DIR when it
# already holds a checkpoint: a requeued job resumes instead of starting over from LOAD).
rlp_require_run_paths() {
  rlp_require \
    DATA "the training text: a .jsonl/.txt file or an indexed-dataset prefix (PREFIX.bin/.idx)" \
    TOKENIZER "the model's tokenizer.json (or its directory)" \
    SAVE_DIR "where checkpoints, metrics.jsonl and tensorboard/ go (shared by all nodes)" \
    LOAD "the base model's Megatron checkpoint directory (RLP starts from a pretrained model)"
  rlp_require_data "$DATA"
  rlp_require_file "$TOKENIZER" "TOKENIZER must be a tokenizer.json or its directory"
  RLP_LOAD=$(rlp_load_or_resume "$SAVE_DIR" "$LOAD")
  rlp_require_file "$RLP_LOAD" "LOAD must be a checkpoint directory"
}

# The Python next to torchrun (the same environment), else python3.
rlp_python() {
  local bin
  bin=$(rlp_torchrun_bin 2>/dev/null) || bin=""
  if [[ -n "$bin" && -x "$(dirname "$bin")/python" ]]; then
    echo "$(dirname "$bin")/python"
  else
    echo python3
  fi
}

# Print the per-rank memory estimate of CONFIG + overrides for WORLD ranks (node 0 only;
# informational: a failure never stops the launch). ESTIMATE=0 skips it.
rlp_estimate() {
  local config=$1 world=$2
  shift 2
  [[ "${ESTIMATE:-1}" == 1 && "${SLURM_NODEID:-0}" == 0 ]] || return 0
  local out rc=0
  out=$("$(rlp_python)" tools/estimate_memory.py --config "$config" --world-size "$world" \
    --gpu-gib "${GPU_GIB:-80}" "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | sed 's/^/[estimate] /'
  # A dry run is the check before a launch: a refused configuration fails it (a real launch
  # goes on, and the trainers refuse it themselves with the same line).
  if (( rc != 0 )) && [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "error: dry run: the configuration is refused (tools/estimate_memory.py exit $rc)" >&2
    return "$rc"
  fi
}

# Print the command (node 0), then run it through `rlp_run workers` (DRY_RUN=1: print only).
rlp_launch() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
    return 0
  fi
  if [[ "${SLURM_NODEID:-0}" == 0 ]]; then
    echo "[launch] $(printf '%q ' "$@")"
  fi
  rlp_run workers "$@"
}

# On stderr (node 0), when a recipe sized for RECIPE_GPUS runs on fewer: the global batch
# stays (the same job, the same thoughts: keyed sampling), so each rank holds more of it.
rlp_fewer_gpus_note() {
  local world=$1 recipe=$2 contexts=$3 dp=$4 g=$5 chunk=$6
  ((world < recipe)) && [[ "${SLURM_NODEID:-0}" == 0 ]] || return 0
  local per_rank=$((contexts / (dp > 0 ? dp : 1))) factor=$((recipe / world))
  local rollouts="in one pass"
  if ((chunk > 0 && chunk < per_rank)); then
    rollouts="in $(((per_rank + chunk - 1) / chunk)) chunks of $chunk"
  fi
  echo "[recipe] note: this recipe is sized for $recipe GPUs ($((recipe / ${GPUS_PER_NODE:-8})) nodes" \
    "x ${GPUS_PER_NODE:-8}); this launch has $world (NNODES=${NNODES:-1}). The same" \
    "$contexts contexts/step now run on DP=$dp: $per_rank contexts x G=$g = $((per_rank * g))" \
    "rollout rows per rank, sampled $rollouts, and as many update sequences: ~${factor}x the" \
    "time per step, and more memory per GPU (Adam state over DP=$dp, not $((dp * factor));" \
    "scoring of ${factor}x the documents). Start-up refuses a launch whose estimate exceeds" \
    "the GPU, naming what would fit (tools/estimate_memory.py). For the recipe's per-rank batch" \
    "instead: CONTEXTS=$((contexts * world / recipe)) (a smaller global batch)." >&2
}

# The paper's RLP settings (32 x H100: 512 contexts/step, 2048-token thoughts and prefixes,
# lr 1e-6 constant, temperature 0.7, tau 0.999) for a model config, a default TP, G and
# rollout chunk (contexts sampled together; 0 = all of a rank's); env vars override (see
# the examples/*.sh headers), then the extra arguments. With the defaults the overrides
# describe the same job as CONFIG alone (tests/tools/test_launch_scripts.py checks it). The
# 8 positions of a document share one window of up to 2 x PREFIX_TOKENS - min_prefix_tokens
# tokens, so that each keeps its full PREFIX_TOKENS prefix: with PREFIX_TOKENS or
# THOUGHT_TOKENS set, max_sequence_length is set to cover 2 x PREFIX_TOKENS + THOUGHT_TOKENS
# (the model configs' own value covers the defaults). RECIPE_GPUS (default 32, the paper's
# 4 nodes x 8) is the world the recipe is sized for: a launch on fewer GPUs says what changes.
rlp_paper_recipe() {
  local default_config=$1 default_tp=$2 default_g=$3 default_chunk=$4
  shift 4
  CONFIG=${CONFIG:-$default_config}
  rlp_require_file "$CONFIG" "the model config"
  rlp_require_run_paths  # DATA TOKENIZER SAVE_DIR LOAD -> RLP_LOAD

  export NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  export NPROC_PER_NODE=$GPUS_PER_NODE
  TP=${TP:-$default_tp} CONTEXTS=${CONTEXTS:-512} GROUP_SIZE=${GROUP_SIZE:-$default_g}
  ROLLOUT_CHUNK=${ROLLOUT_CHUNK:-$default_chunk}
  local lengths_set=${THOUGHT_TOKENS:-}${PREFIX_TOKENS:-}
  THOUGHT_TOKENS=${THOUGHT_TOKENS:-2048} PREFIX_TOKENS=${PREFIX_TOKENS:-2048}

  local overrides=(
    device.type=cuda precision.params_dtype=bf16
    parallel.tensor_model_parallel_size="$TP" parallel.pipeline_model_parallel_size="${PP:-1}"
    parallel.use_distributed_optimizer=true
    rlp.contexts_per_step="$CONTEXTS" rlp.group_size="$GROUP_SIZE"
    rlp.rollout_chunk_contexts="$ROLLOUT_CHUNK"
    rlp.max_thought_tokens="$THOUGHT_TOKENS" rlp.max_prefix_tokens="$PREFIX_TOKENS"
    rlp.positions_per_document=8 rlp.temperature=0.7 rlp.ema_decay=0.999
    optimizer.lr=1e-6 optimizer.min_lr=1e-6 optimizer.lr_decay_style=constant
    optimizer.weight_decay=0.1 optimizer.adam_beta1=0.9 optimizer.adam_beta2=0.95
    train.micro_batch_size="${MICRO_BATCH:-1}" train.steps="${STEPS:-500}"
    train.save="$SAVE_DIR" train.save_interval="${SAVE_INTERVAL:-25}" train.load="$RLP_LOAD"
    train.metrics_file="$SAVE_DIR/metrics.jsonl" train.tensorboard_dir="$SAVE_DIR/tensorboard"
    data.corpus="$DATA" data.tokenizer="$TOKENIZER"
  )
  if [[ -n "$lengths_set" ]]; then
    overrides+=(model.max_sequence_length=$((2 * PREFIX_TOKENS + THOUGHT_TOKENS + 64)))
  fi
  if [[ -n "${WANDB_PROJECT:-}" ]]; then
    overrides+=(train.wandb_project="$WANDB_PROJECT")
  fi

  local world=$((NNODES * GPUS_PER_NODE))
  rlp_fewer_gpus_note "$world" "${RECIPE_GPUS:-32}" "$CONTEXTS" $((world / (TP * ${PP:-1}))) \
    "$GROUP_SIZE" "$ROLLOUT_CHUNK"
  rlp_estimate "$CONFIG" "$world" "${overrides[@]}" "$@"
  rlp_torchrun_args
  rlp_launch "${RLP_TORCHRUN[@]}" pretrain_rlp.py --config "$CONFIG" "${overrides[@]}" "$@"
}
