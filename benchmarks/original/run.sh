#!/usr/bin/env bash
# This project against the original Equiformer on the same molecules (molecules.py: aspirin, the
# 60- and 120-atom AT-AT clusters), one thread, fp32, each implementation in its own process.
#
#   benchmarks/original/run.sh EQUIFORMER_CLONE [OUT_DIR] [memory|speed|all]   # default: results/, all
#
# memory: levers-off memory of one training step, same meter (peak of live tensor bytes, profiler
#   allocation events): original.json, this_*.json, table by compare.py. ~15 min on 2 cores.
# speed: training step (forces with create_graph, the original's 1:80 L2MAE loss, AdamW) and
#   inference step (energy + forces, no create_graph), timed for the original (step.py --speed),
#   this project levers off and with memory.checkpointing=forces (this_step.py); a fresh process
#   per (round, molecule, implementation), the implementations' order rotated every round so that
#   machine drift hits all alike; ROUNDS (default 3) rounds of STEPS (default 2) timed steps each;
#   the medians over all of them and the ratios against the original: speed.json and speed.md
#   (compare.py --speed). ~30-45 min on 2 shared cores at the defaults (the code of issue 27's
#   before). MOLECULES (default "aspirin cluster60 cluster120"): a subset, e.g. for a quick check:
#   MOLECULES=aspirin ROUNDS=1 STEPS=1 run.sh CLONE /tmp/x speed
#
# EQUIFORMER_CLONE: a clone of https://github.com/atomicarchitects/equiformer (the figures in
# benchmarks/memory_original.md and benchmarks/speed.md are from commit 64cb786). Builds
# .venv-original (e3nn 0.4.4, what the original pins; torch from constraints.txt) on the first
# run. PYTHON: this project's interpreter (default ROOT/.venv/bin/python); ORIGINAL_PYTHON: the
# original's (default ROOT/.venv-original/bin/python, built when missing). BEFORE=DIR (speed only):
# also this project levers off as imported from the checkout DIR (e.g. a worktree at the commit
# before a change), a fourth implementation in the same rotation: "before, levers off".
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
REPO="${1:?usage: run.sh EQUIFORMER_CLONE [OUT_DIR] [memory|speed|all]}"
OUT="${2:-$ROOT/benchmarks/original/results}"
WHAT="${3:-all}"
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-2}"
MOLECULES="${MOLECULES:-aspirin cluster60 cluster120}"
mkdir -p "$OUT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export OMP_NUM_THREADS=1
ORIG="${ORIGINAL_PYTHON:-$ROOT/.venv-original/bin/python}"
if [ ! -x "$ORIG" ]; then
  python3 -m venv "$ROOT/.venv-original"
  "$ROOT/.venv-original/bin/pip" install --quiet -c "$ROOT/constraints.txt" torch "e3nn==0.4.4" torch_geometric timm numpy
  ORIG="$ROOT/.venv-original/bin/python"
fi
"$PY" "$ROOT/benchmarks/original/molecules.py" "$OUT/molecules.npz"
if [ "$WHAT" = memory ] || [ "$WHAT" = all ]; then
  "$ORIG" "$ROOT/benchmarks/original/step.py" --repo "$REPO" --molecules "$OUT/molecules.npz" --json "$OUT/original.json"
  for mol in "--data $ROOT/scalable_equiformer/demo_data/aspirin_xtb_500K.npz" "--atoms 60" "--atoms 120"; do
    name=$(echo "$mol" | sed -e 's/.*aspirin.*/aspirin/' -e 's/--atoms /cluster/')
    # shellcheck disable=SC2086
    "$PY" "$ROOT/tools/memory_profile.py" --config md17_aspirin $mol --batch-size 1 --levers none --meter alloc \
      --timing-steps 2 --json "$OUT/this_$name.json"
  done
  "$PY" "$ROOT/benchmarks/original/compare.py" "$OUT/original.json" "$OUT"/this_*.json
fi
if [ "$WHAT" = speed ] || [ "$WHAT" = all ]; then
  SPEED="$OUT/speed"
  rm -rf "$SPEED" && mkdir -p "$SPEED"
  impls=(original none forces)
  if [ -n "${BEFORE:-}" ]; then impls+=(before); fi
  n=${#impls[@]}
  for r in $(seq 1 "$ROUNDS"); do
    for mol in $MOLECULES; do
      for k in $(seq 0 $((n - 1))); do
        impl=${impls[$(( (k + r - 1) % n ))]}
        json="$SPEED/r${r}_${mol}_${impl}.json"
        if [ "$impl" = original ]; then
          "$ORIG" "$ROOT/benchmarks/original/step.py" --repo "$REPO" --molecules "$OUT/molecules.npz" --speed \
            --molecule "$mol" --steps "$STEPS" --json "$json" 2>>"$SPEED/stderr.log"
        elif [ "$impl" = before ]; then
          "$PY" "$ROOT/benchmarks/original/this_step.py" --molecules "$OUT/molecules.npz" --molecule "$mol" \
            --checkpointing none --package-root "$BEFORE" --label "before, levers off" --steps "$STEPS" \
            --json "$json" 2>>"$SPEED/stderr.log"
        else
          "$PY" "$ROOT/benchmarks/original/this_step.py" --molecules "$OUT/molecules.npz" --molecule "$mol" \
            --checkpointing "$impl" --steps "$STEPS" --json "$json" 2>>"$SPEED/stderr.log"
        fi
      done
    done
  done
  "$PY" "$ROOT/benchmarks/original/compare.py" --speed "$SPEED"/r*.json --json "$OUT/speed.json" | tee "$OUT/speed.md"
fi
