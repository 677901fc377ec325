#!/usr/bin/env bash
# Everything issue 14 asks of one GPU, in one command of at most ~9.5 minutes (default budget 555 s):
#   - the equivalence tests with CUDA tensors (levers vs plain path, partitions vs one process,
#     the calculator on the GPU vs the CPU): pytest -m gpu_equivalence --device cuda
#   - tools/memory_profile.py --device cuda over the seven MD22 sizes (42-370 atoms) at batch 8 with
#     levers none / forces / forces+edge chunks / bf16 / forces+bf16 / keep_blocks=3:
#     max_memory_allocated, step time, time ratios; does 370 atoms x 8 fit in the GPU's memory?
#   - train.py throughput (molecules/s): md17_aspirin (batch 8) and md22_atat (DeepSpeed ZeRO-2,
#     NCCL) in fp32 and bf16, plain torch for comparison; the planner's estimate vs each CUDA peak
# Each phase has a time limit (a share of the budget) and a failing phase is recorded in
# OUT/summary.json / summary.md while the next ones run (benchmarks/gpu/run.py says what each does).
#
#   benchmarks/gpu/run.sh [--device cuda|cpu] [--budget SECONDS] [OUT]      # OUT default: $OUT
#
# On the GPU machine (python3 with its own torch, e3nn, torch-geometric, pytest; no network): the
# wheels in .whl/ (made beforehand by benchmarks/gpu/prepare_wheels.sh, carried with the checkout)
# whose distributions are missing (deepspeed, ase, pydantic, ...) are installed with
# `pip install --no-index --no-deps --target` into a folder put on PYTHONPATH; nothing else is
# installed and torch is never touched. The package runs from the checkout (PYTHONPATH=.).
# --device cpu: tiny model and molecules, 3 training steps (CI runs it: tests/test_gpu_script.py).
# Environment: PYTHON (default python3), WHEELS (default .whl), SE_WHEEL_SITE (default a temp folder).
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=cuda
BUDGET=""
DEST="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --budget=*) BUDGET="${1#*=}"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
        *) DEST="$1"; shift ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "run.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
if [ -z "$DEST" ]; then
    echo "run.sh: give an output folder (or set OUT)" >&2
    exit 2
fi
if [ -z "$BUDGET" ]; then
    # the whole script, the outer safety limit below included: at most 9.5 min on the GPU (600 s per device command)
    if [ "$DEVICE" = cuda ]; then BUDGET=555; else BUDGET=460; fi
fi
mkdir -p "$DEST"
PY=${PYTHON:-python3}
START=$SECONDS

# --- wheels: install only what is missing (never torch: prepare_wheels.sh fetches none) ----------
WHEELS=${WHEELS:-.whl}
SITE=${SE_WHEEL_SITE:-$(mktemp -d /tmp/se_wheels_site.XXXXXX)}
installed=()
present=()
status="no wheels folder ($WHEELS): nothing installed"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    need=()
    for w in "$WHEELS"/*.whl; do
        dist=$(basename "$w" | cut -d- -f1)
        if "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
            present+=("$dist")
        else
            need+=("$w")
            installed+=("$dist")
        fi
    done
    if [ ${#need[@]} -gt 0 ]; then
        if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "${need[@]}" > "$SITE.log" 2>&1; then
            status="ok: ${#need[@]} installed into $SITE"
        else
            status="FAILED (pip install into $SITE): $(tail -3 "$SITE.log" | tr '\n' ' ')"
        fi
    else
        status="ok: every wheel's distribution already there"
    fi
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export SE_WHEELS_STATUS="$status" SE_WHEELS_INSTALLED="${installed[*]:-}" SE_WHEELS_PRESENT="${present[*]:-}"
export SE_WHEELS_SECONDS=$((SECONDS - START))
echo "wheels: $status (${SE_WHEELS_SECONDS} s)"

LEFT=$((BUDGET - (SECONDS - START)))
[ "$LEFT" -lt 30 ] && LEFT=30
# run.py keeps to LEFT (each phase killed at its share); the outer limit only catches a hang of run.py itself
timeout -k 5 $((LEFT + 15)) "$PY" benchmarks/gpu/run.py --device "$DEVICE" --budget "$LEFT" --out "$DEST" --python "$PY"
rc=$?
[ -z "${SE_WHEEL_SITE:-}" ] && rm -rf "$SITE" "$SITE.log"
exit $rc
