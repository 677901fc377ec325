#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that benchmarks/gpu/run.sh installs on a GPU machine that
# has no network: run it HERE (a machine with the package registry), then carry .whl/ with the checkout.
#
#   benchmarks/gpu/prepare_wheels.sh            # uses .venv/bin/python; PY=... to use another
#
# The GPU machine (one H200; Python 3.12, its own PyTorch 2.11 + CUDA 13, e3nn, torch-geometric,
# pytest, numpy, scipy, matplotlib, pyyaml, tensorboard, tqdm, psutil, ... preinstalled) lacks
# deepspeed and ase. This fetches them and their non-torch needs, at the versions of .venv (the ones
# this project tests), as CPython 3.12 manylinux x86_64 wheels:
#   deepspeed (published as an sdist only: built here into a pure-python wheel, no ops compiled;
#              the optimizer is torch's AdamW, so no DeepSpeed op is ever built or loaded),
#   its needs: hjson, pydantic, pydantic-core, annotated-types, typing-inspection, and, though the
#              machine has them, ninja, py-cpuinfo, msgpack, psutil, einops, tqdm, packaging,
#              typing-extensions (run.sh installs a wheel only when its distribution is missing);
#   ase (needs numpy, scipy, matplotlib, typing-extensions: preinstalled there; scipy's wheel alone
#        is ~35 MB, which the 64 MiB transfer limit cannot take next to the checkout).
#   cuequivariance, cuequivariance-torch (model.tensor_product=cueq; pure python) and opt_einsum;
#   with CUEQ_OPS=cu13 (or cu12: the machine's CUDA) also cuequivariance-ops-torch-$CUEQ_OPS and
#   cuequivariance-ops-$CUEQ_OPS, the CUDA kernels (without them cueq runs its naive PyTorch method
#   and the tp phase says so); mind their size against the 64 MiB transfer limit.
# Never torch, numpy or anything with CUDA in it. The scalable_equiformer package itself is used
# from the checkout (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DEST=${WHEELS:-.whl}
ver() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
DOWNLOAD=(download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DEST")

echo "deepspeed==$(ver deepspeed): building a pure-python wheel from the sdist"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(ver deepspeed)"
for name in hjson pydantic pydantic_core annotated_types typing_inspection ase \
            cuequivariance cuequivariance_torch opt_einsum \
            ninja py_cpuinfo msgpack psutil einops tqdm packaging typing_extensions; do
    echo "$name==$(ver "$name")"
    "$PY" -m pip "${DOWNLOAD[@]}" "$name==$(ver "$name")"
done
if [ -n "${CUEQ_OPS:-}" ]; then
    for name in "cuequivariance-ops-torch-$CUEQ_OPS" "cuequivariance-ops-$CUEQ_OPS"; do
        echo "$name==$(ver cuequivariance_torch)"
        "$PY" -m pip "${DOWNLOAD[@]}" "$name==$(ver cuequivariance_torch)"
    done
fi

n=$(ls "$DEST"/*.whl | wc -l)
if [ "$(ls "$DEST" | grep -v '\.whl$' | wc -l)" != 0 ]; then
    echo "error: $DEST holds files that are not wheels" >&2
    exit 1
fi
echo
ls -1s --block-size=K "$DEST"
echo "$n wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
