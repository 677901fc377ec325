#!/usr/bin/env bash
# The runs behind benchmarks/memory.md (CPU, one thread per measurement and per rank, the paper's
# Lmax-2 model: the dataclass defaults). Each line writes one JSON next to this script.
# ~45 CPU-minutes; `stream1` and `stream2` can run side by side on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
XTB=${XTB:-../shared/data/xtb}
MP="$PY tools/memory_profile.py --set data.name=synthetic"
PARTS="--levers graph_partitions=2 --levers graph_partitions=4 --levers graph_partitions=2,checkpointing=forces
       --levers graph_partitions=4,checkpointing=forces --levers graph_partitions=4,precision=bf16"

stream1() {
  # aspirin (21 atoms), the paper's batch of 8 molecules: every single-process lever set
  $MP --data $XTB/aspirin_xtb_500K.npz --batch-size 8 --compare --json benchmarks/memory_aspirin_b8.json
  # AT-AT (60 atoms), a batch of 4
  $MP --data $XTB/AT-AT_xtb_500K.npz --batch-size 4 --levers none --levers micro_batch_size=1 \
      --levers checkpointing=forces,micro_batch_size=1 --json benchmarks/memory_atat_b4.json
  # AT-AT, one molecule per step: every lever set, graph partitions included (P ranks, gloo)
  $MP --data $XTB/AT-AT_xtb_500K.npz --batch-size 1 --compare $PARTS --json benchmarks/memory_atat_b1.json
  # AT-AT, force-aware checkpointing with the last k blocks kept (not recomputed)
  $MP --data $XTB/AT-AT_xtb_500K.npz --batch-size 1 --levers none --levers checkpointing=forces --levers keep_blocks=1 \
      --levers keep_blocks=2 --levers keep_blocks=3 --levers keep_blocks=4 --json benchmarks/memory_keep_atat_b1.json
}

stream2() {
  # a 120-atom molecule (two AT-AT copies at real density, ~ AT-AT-CG-CG's 118 atoms)
  $MP --atoms 120 --batch-size 1 --levers none --levers checkpointing=blocks --levers checkpointing=forces \
      --levers precision=bf16 --levers checkpointing=forces,precision=bf16 \
      --levers checkpointing=forces,edge_chunk_size=auto $PARTS --json benchmarks/memory_120_b1.json
  # memory against molecule size, per lever set
  $MP --sweep atoms --sweep-atoms 30,60,120,180 --batch-size 1 --levers none --levers checkpointing=blocks \
      --levers checkpointing=forces --levers checkpointing=forces,edge_chunk_size=auto --timing-steps 0 \
      --json benchmarks/memory_sweep.json --plot benchmarks/memory_sweep.png
}

plans() {
  # the plan for a 40 GB GPU, AT-AT at the paper's batch of 8 (estimates only)
  $MP --data $XTB/AT-AT_xtb_500K.npz --batch-size 8 --plan --gpu-memory 40GB --estimate-only \
      --json benchmarks/memory_plan_atat_40GB.json
  # the largest MD22 size (370 atoms, synthetic) at batch 8 on 40 GB and 16 GB, and one molecule
  # per step on 4 GPUs of 8 GB (estimates only)
  for g in 40GB 16GB; do
      $MP --atoms 370 --batch-size 8 --plan --gpu-memory $g --estimate-only --allow-bf16 --json benchmarks/memory_plan_370_$g.json
  done
  $MP --atoms 370 --batch-size 1 --plan --gpu-memory 8GB --gpus 4 --estimate-only --json benchmarks/memory_plan_370_b1_4x8GB.json
}

case "${1:-all}" in
  stream1) stream1 ;;
  stream2) stream2 ;;
  plans) plans ;;
  all) stream1; stream2; plans ;;
  *) echo "usage: $0 [stream1|stream2|plans|all]" >&2; exit 2 ;;
esac
