#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or fail with a clear message.
# Order: $PYTHON, then 3.12 (the verified version) before newer ones, PATH before pyenv.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for minor in 12 13 14; do
  p=$(command -v "python3.$minor" 2>/dev/null) && candidates+=("$p")
  for q in $(ls -d "$root"/versions/3."$minor".*/bin/python3 2>/dev/null | sort -rV); do
    candidates+=("$q")
  done
done
p=$(command -v python3 2>/dev/null) && candidates+=("$p")
for p in "${candidates[@]}"; do
  if ok "$p"; then echo "$p"; exit 0; fi
done
echo "error: megatron-rlp needs Python >= 3.12 (megatron-core 0.19 requires it); none found." >&2
echo "       Install one (e.g. 'pyenv install 3.12') or pass PYTHON=/path/to/python3.12." >&2
exit 1
