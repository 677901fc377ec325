#!/usr/bin/env bash
# The runs behind benchmarks/memory.md (CPU, one thread per measurement, the paper's Lmax-2 model:
# the dataclass defaults). Each line writes one JSON next to this script. ~1.5 CPU-hours.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
XTB=${XTB:-../shared/data/xtb}
MP="$PY tools/memory_profile.py --set data.name=synthetic"

# aspirin (21 atoms), the paper's batch of 8 molecules: every lever set
$MP --data $XTB/aspirin_xtb_500K.npz --batch-size 8 --compare --json benchmarks/memory_aspirin_b8.json
# AT-AT (60 atoms), one molecule per step, and a batch of 4
$MP --data $XTB/AT-AT_xtb_500K.npz --batch-size 1 --compare --json benchmarks/memory_atat_b1.json
$MP --data $XTB/AT-AT_xtb_500K.npz --batch-size 4 --levers none --levers micro_batch_size=1 \
    --levers checkpointing=forces,micro_batch_size=1 --json benchmarks/memory_atat_b4.json
# a 120-atom molecule (two AT-AT copies at real density, ~ AT-AT-CG-CG's 118 atoms)
$MP --atoms 120 --batch-size 1 --levers none --levers checkpointing=blocks --levers checkpointing=forces \
    --levers precision=bf16 --levers checkpointing=forces,precision=bf16 \
    --levers checkpointing=forces,edge_chunk_size=auto --json benchmarks/memory_120_b1.json
# memory against molecule size, per lever set
$MP --sweep atoms --sweep-atoms 30,60,120,180 --batch-size 1 --levers none --levers checkpointing=blocks \
    --levers checkpointing=forces --levers checkpointing=forces,edge_chunk_size=auto --timing-steps 0 \
    --json benchmarks/memory_sweep.json --plot benchmarks/memory_sweep.png
# the plan for a 40 GB GPU, AT-AT at the paper's batch of 8 (estimates only)
$MP --data $XTB/AT-AT_xtb_500K.npz --batch-size 8 --plan --gpu-memory 40GB --estimate-only \
    --json benchmarks/memory_plan_atat_40GB.json
# the plans for the largest MD22 size (370 atoms, synthetic) at batch 8, 40 GB and 16 GB (estimates only)
for g in 40GB 16GB; do
    $MP --atoms 370 --batch-size 8 --plan --gpu-memory $g --estimate-only --allow-bf16 --json benchmarks/memory_plan_370_$g.json
done
