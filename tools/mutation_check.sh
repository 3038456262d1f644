#!/usr/bin/env bash
# Mutation check (issue 15): plant each known bug in a scratch copy of the repository and run
# the tests that should catch it. Every planted bug must make those tests fail; the script
# exits 1 naming any bug the suite missed, 3 if a planting pattern no longer matches the code
# (re-point it), 0 when every bug was caught. The unmodified copy must pass the same tests.
#
#   tools/mutation_check.sh            # all bugs (~2 min on 2 CPU cores)
#   tools/mutation_check.sh ema-tau    # one bug by name
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/mutation_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

# The working tree as git sees it (tracked + untracked, not ignored), without .venv/runs.
git -C "$ROOT" ls-files -co --exclude-standard -z \
    | (cd "$ROOT" && tar --null -cf - -T -) | tar -C "$SCRATCH" -xf -

STEP_REF=tests/e2e/test_step_reference.py
STEP=tests/e2e/test_rlp_step.py
ENTROPY=tests/unit/test_entropy_reference.py

# name | file | exact text to replace (must occur exactly once) | replacement | tests
# (several replacements in one file: texts and replacements separated by @@)
BUGS=(
  "teacher-is-policy|megatron_rlp/train/rlp_step.py|score_next_tokens(state.teacher.model,|score_next_tokens(state.policy,|$STEP_REF"
  "s-ema-wrong-thoughts|megatron_rlp/train/rlp_step.py|s_ema.repeat_interleave(r.group_size)|s_ema.repeat(r.group_size)|$STEP_REF"
  "ema-tau|megatron_rlp/scoring/ema_teacher.py|torch._foreach_mul_(phi, self.decay)@@alpha=1.0 - self.decay)|torch._foreach_mul_(phi, 1.0 - self.decay)@@alpha=self.decay)|$STEP_REF $STEP"
  "s-ema-wrong-column|megatron_rlp/data/batches.py|cols.append(c.position - ws - 1)|cols.append(c.position - ws - 2)|$STEP_REF"
  "entropy-padded-vocab|megatron_rlp/scoring/entropy.py|logits = logits.masked_fill(ids >= vocab_size, float(\"-inf\"))|logits = logits|$ENTROPY"
)

run_tests() {  # run_tests TESTS... -> pytest's exit code, output in $SCRATCH/log
    (cd "$SCRATCH" && PYTHONPATH="$SCRATCH" OMP_NUM_THREADS=1 "$PY" -m pytest -q -x \
        -p no:cacheprovider "$@" >"$SCRATCH/log" 2>&1)
}

plant() {  # plant FILE OLDS NEWS: replace each OLD (exactly one occurrence) in the copy
    "$PY" - "$SCRATCH/$1" "$2" "$3" <<'PYEOF'
import sys
path, olds, news = sys.argv[1:]
text = open(path).read()
for old, new in zip(olds.split("@@"), news.split("@@"), strict=True):
    if text.count(old) != 1:
        sys.exit(f"pattern occurs {text.count(old)} times in {path} (expected once): {old!r}")
    text = text.replace(old, new)
open(path, "w").write(text)
PYEOF
}

want=("$@")
selected=()
all_tests=()
for bug in "${BUGS[@]}"; do
    IFS='|' read -r name _ _ _ tests <<<"$bug"
    if ((${#want[@]})) && [[ " ${want[*]} " != *" $name "* ]]; then continue; fi
    selected+=("$bug")
    read -ra words <<<"$tests"
    for t in "${words[@]}"; do [[ " ${all_tests[*]} " == *" $t "* ]] || all_tests+=("$t"); done
done
((${#selected[@]})) || { echo "[mutation] no bug named: ${want[*]}" >&2; exit 2; }
for bug in "${selected[@]}"; do  # every pattern must still apply, before any test runs
    IFS='|' read -r name file old new _ <<<"$bug"
    cp "$SCRATCH/$file" "$SCRATCH/$file.orig"
    if ! plant "$file" "$old" "$new"; then
        echo "[mutation] $name: planting pattern no longer applies to $file; re-point it" >&2
        exit 3
    fi
    mv "$SCRATCH/$file.orig" "$SCRATCH/$file"
done
start=$SECONDS
if ! run_tests "${all_tests[@]}"; then
    tail -20 "$SCRATCH/log"
    echo "[mutation] the tests fail WITHOUT any planted bug; fix them first" >&2
    exit 1
fi
echo "[mutation] unmodified copy passes ${all_tests[*]} ($((SECONDS - start))s)"
missed=()
for bug in "${selected[@]}"; do
    IFS='|' read -r name file old new tests <<<"$bug"
    cp "$SCRATCH/$file" "$SCRATCH/$file.orig"
    if ! plant "$file" "$old" "$new"; then
        echo "[mutation] $name: planting pattern no longer applies to $file; re-point it" >&2
        exit 3
    fi
    start=$SECONDS
    # shellcheck disable=SC2086
    if run_tests $tests; then
        echo "[mutation] $name: NOT caught by $tests"
        missed+=("$name")
    else
        caught=$(grep -m1 -E '^(FAILED|ERROR) ' "$SCRATCH/log" || true)
        echo "[mutation] $name: caught in $((SECONDS - start))s (${caught:-see log})"
    fi
    mv "$SCRATCH/$file.orig" "$SCRATCH/$file"
done
if ((${#missed[@]})); then
    echo "[mutation] bugs the suite missed: ${missed[*]}" >&2
    exit 1
fi
echo "[mutation] every planted bug was caught"
