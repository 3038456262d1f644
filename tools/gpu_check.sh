#!/usr/bin/env bash
# GPU check in one command, on the lent machine as it is (docs/gpu/README.md):
#
#   bash tools/gpu_check.sh                       # < 5 minutes; 2 files in $OUT
#   bash tools/gpu_check.sh --dry-run             # the whole pipeline on CPU (tests)
#
# 1. The machine's own python3 (there: /opt/torch/.venv/bin/python3, torch with CUDA, Triton,
#    transformers); no venv. The wheels committed under wheels/ (megatron-core 0.19.2, einops,
#    psutil, mamba-ssm 2.3.2.post1 built without its CUDA extension: its Triton kernels need
#    none), checked against wheels/SHA256SUMS, go into a fresh folder with
#    `pip install --no-index --no-deps --target`, which PYTHONPATH then names.
# 2. tools/gpu_check.py runs the stages (preflight first), each killed at its own cap, and
#    packs its outputs into $OUT/gpu_check.json and $OUT/gpu_check_logs.txt.
#
# Environment: PYTHON (default python3), WHEELS (default wheels/), GPU_CHECK_SITE (the
# install folder, default /tmp/gpu_check_site), OUT (default runs/gpu_check),
# GPU_CHECK_TIMEOUT (seconds for the whole python part, default 295; 3600 with --dry-run). Arguments go to
# tools/gpu_check.py. Exit: 0 every stage passed, 1 a stage failed, 2 this machine cannot
# run the check (one line says why), 124 the whole check ran past GPU_CHECK_TIMEOUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

py=${PYTHON:-python3}
wheels=${WHEELS:-wheels}
site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
out=${OUT:-runs/gpu_check}

die() { echo "error: $*" >&2; exit 2; }

"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null ||
  die "$py is not a Python >= 3.12 (megatron-core 0.19.2 needs it); set PYTHON="
"$py" -c 'import torch' 2>/dev/null ||
  die "torch does not import in $py; this check uses the machine's own torch"
shopt -s nullglob
found=("$wheels"/*.whl)
shopt -u nullglob
[ "${#found[@]}" -gt 0 ] || die "$wheels/ holds no wheels (see wheels/README.md)"
[ -f "$wheels/SHA256SUMS" ] || die "$wheels/SHA256SUMS is missing"
(cd "$wheels" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1) ||
  die "$wheels/ does not match $wheels/SHA256SUMS (fetch the wheels again, wheels/README.md)"
[ "$(grep -c '\.whl$' "$wheels/SHA256SUMS")" -eq "${#found[@]}" ] ||
  die "$wheels/ holds wheels that $wheels/SHA256SUMS does not list"

rm -rf "$site"
start=$SECONDS
timeout 120 "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
  --disable-pip-version-check --target "$site" "${found[@]}" ||
  die "pip install --no-index --no-deps --target $site failed for $wheels/*.whl"
echo "[gpu_check] installed ${#found[@]} wheels into $site ($((SECONDS - start)) s, no network)"

export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
limit=${GPU_CHECK_TIMEOUT:-295}
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then limit=${GPU_CHECK_TIMEOUT:-3600}; fi  # CPU: minutes
done
mkdir -p "$out"
timeout -k 10 "$limit" "$py" tools/gpu_check.py --out "$out" "$@"
