#!/usr/bin/env bash
# Levers-off memory of one training step, this project against the original Equiformer, on the
# same molecules with the same meter (peak of live tensor bytes, profiler allocation events).
#
#   benchmarks/original/run.sh EQUIFORMER_CLONE [OUT_DIR]     # default OUT_DIR: benchmarks/original/results
#
# EQUIFORMER_CLONE: a clone of https://github.com/atomicarchitects/equiformer (the figures in
# benchmarks/memory_original.md are from commit 64cb786). Builds .venv-original (e3nn 0.4.4, what
# the original pins; torch from constraints.txt) on the first run. ~15 min on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
REPO="${1:?usage: run.sh EQUIFORMER_CLONE [OUT_DIR]}"
OUT="${2:-$ROOT/benchmarks/original/results}"
mkdir -p "$OUT"
PY="$ROOT/.venv/bin/python"
if [ ! -x "$ROOT/.venv-original/bin/python" ]; then
  python3 -m venv "$ROOT/.venv-original"
  "$ROOT/.venv-original/bin/pip" install --quiet -c "$ROOT/constraints.txt" torch "e3nn==0.4.4" torch_geometric timm numpy
fi
"$PY" "$ROOT/benchmarks/original/molecules.py" "$OUT/molecules.npz"
"$ROOT/.venv-original/bin/python" "$ROOT/benchmarks/original/step.py" --repo "$REPO" --molecules "$OUT/molecules.npz" --json "$OUT/original.json"
for mol in "--data $ROOT/scalable_equiformer/demo_data/aspirin_xtb_500K.npz" "--atoms 60" "--atoms 120"; do
  name=$(echo "$mol" | sed -e 's/.*aspirin.*/aspirin/' -e 's/--atoms /cluster/')
  # shellcheck disable=SC2086
  "$PY" "$ROOT/tools/memory_profile.py" --config md17_aspirin $mol --batch-size 1 --levers none --meter alloc \
    --timing-steps 2 --json "$OUT/this_$name.json"
done
"$PY" "$ROOT/benchmarks/original/compare.py" "$OUT/original.json" "$OUT"/this_*.json
