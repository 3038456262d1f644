#!/usr/bin/env bash
# GPU check in one command, for a bare single-GPU machine (an H200: Python 3.12, torch with
# CUDA, Triton, transformers, tokenizers; no megatron-core, no Transformer Engine, no network):
#
#   bash tools/gpu_check.sh            # ~5 minutes; JSON in $OUT (else runs/gpu_check/)
#
# 1. Where megatron-core does not import, a venv that sees the system torch
#    (--system-site-packages) gets the wheels committed under wheels/ (2.5 MB: megatron-core
#    and einops + psutil, which its Mamba and checkpointing code import; numpy, packaging and
#    PyYAML come with transformers), checked against wheels/SHA256SUMS and installed with
#    --no-index --no-deps. To fetch them again, on a machine with network:
#      python3.12 -m pip download megatron-core==0.19.2 einops psutil --no-deps -d wheels/
# 2. tools/gpu_check.py runs the tiny dense and hybrid configs on CUDA in bf16, compares their
#    step-1 rewards with CPU fp32 runs, runs one RLP step of a Qwen3-1.7B-shaped model and
#    writes gpu_check.json (decode vs HBM roofline, update MFU, peak memory).
#
# Transformer Engine is not installed by this script (its core wheel is ~730 MB); where it is
# installed (NGC images) model.transformer_impl=auto picks its layers up.
# Environment: PYTHON (interpreter, default python3), OUT (result folder), WHEELS (default
# wheels/), GPU_CHECK_VENV (default runs/gpu_check_venv). Arguments go to tools/gpu_check.py
# (e.g. --device cpu --dry-run --dtype fp32 runs the whole path tiny on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

py=${PYTHON:-python3}
wheels=${WHEELS:-wheels}
venv=${GPU_CHECK_VENV:-runs/gpu_check_venv}
out=${OUT:-runs/gpu_check}

if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
  echo "error: $py is not a Python >= 3.12 (megatron-core 0.19.2 needs it); set PYTHON=" >&2
  exit 2
fi
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "error: torch does not import in $py; this check uses the machine's own torch" >&2
  exit 2
fi

if ! "$py" -c 'import megatron.core, einops, psutil' 2>/dev/null; then
  shopt -s nullglob
  found=("$wheels"/megatron_core-0.19.2-*.whl)
  shopt -u nullglob
  if [ "${#found[@]}" -eq 0 ]; then
    echo "error: megatron-core does not import and $wheels/ has no megatron_core-0.19.2 wheel;" \
      "on a machine with network run:" \
      "python3.12 -m pip download megatron-core==0.19.2 einops psutil --no-deps -d $wheels/" >&2
    exit 2
  fi
  if [ -f "$wheels/SHA256SUMS" ] && ! (cd "$wheels" && sha256sum --quiet -c SHA256SUMS); then
    echo "error: $wheels/ does not match $wheels/SHA256SUMS (fetch the wheels again)" >&2
    exit 2
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv --system-site-packages "$venv"
  fi
  py=$venv/bin/python
  echo "[gpu_check] installing $(cd "$wheels" && echo ./*.whl) into $venv (no network)"
  "$py" -m pip install --quiet --no-index --no-deps --disable-pip-version-check "$wheels"/*.whl
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
exec "$py" tools/gpu_check.py --out "$out" "$@"
