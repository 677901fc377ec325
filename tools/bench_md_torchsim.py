#!/usr/bin/env python
"""Throughput of the batched engine: K copies of the shipped AT-AT (60 atoms) in one TorchSim NVE run.

    python tools/bench_md_torchsim.py --checkpoint runs/md22_atat/best.pt --systems 1 8 32 --steps 10
    python tools/bench_md_torchsim.py --config md22_atat --systems 8 --steps 5 --device cuda   # untrained weights

The model: a training checkpoint (``--checkpoint``), or ``--config NAME`` built with the demo
AT-AT frames' statistics and untrained weights (the speed does not depend on the weights), written
to a temporary checkpoint so that it is loaded as a trained one is.

For each K of ``--systems``: K copies of frame 0 of ``demo_data/AT-AT_xtb_500K_20frames.npz`` in
one :class:`torch_sim.SimState`, momenta drawn by TorchSim at 300 K (seed 0, each copy its own),
TorchSim's velocity-Verlet NVE with ``--timestep`` fs: ``--warmup`` steps untimed, then ``--steps``
timed. Every step is one forward of the model over all K molecules
(:class:`scalable_equiformer.md.torchsim.EquiformerModel`). Reported per K: ms per step, ns/day of
each system and in aggregate (K x that: the simulated time the batch produces per day), the share
of the step spent in the model (the rest is TorchSim's integration), of which in the neighbour
list (Verlet search + cutoff filter), model evaluations and neighbour searches per step.

``bench_torchsim`` takes the arguments of ``tools/bench_md.py``'s engine functions (one Atoms or a list).
The results go to ``--out`` (JSON, default runs/bench_md_torchsim.json): one row per (model, dtype,
device, K); rows of an existing file for others are kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_md import ATAT, add_model_arguments, model_of, write_rows  # noqa: E402  (the ASE/OpenMM benchmark's)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_torchsim(checkpoint, atoms_list, steps: int, timestep_fs: float, *, warmup: int = 2, device=None,
                   dtype=None, temperature_K: float = 300.0, seed: int = 0, **_) -> dict:
    """NVE of ``atoms_list`` (a list of ASE Atoms, or one) as one TorchSim batch; timings of ``steps`` steps.

    Returns ``steps``, ``n_systems``, ``atoms`` (all systems), ``seconds`` (the timed steps),
    ``model_seconds`` (of which in the model), ``neighbour_seconds`` (of which in the neighbour
    list), ``evaluations``, ``searches``, ``ms_per_step``, ``ns_per_day`` (each system),
    ``ns_per_day_aggregate`` (all systems), ``model_share``, ``timestep_fs``, ``device``, ``detail``.
    """
    import torch
    import torch_sim as ts
    from ase import Atoms
    from torch_sim.units import MetalUnits

    from scalable_equiformer.md.torchsim import EquiformerModel

    atoms_list = [atoms_list] if isinstance(atoms_list, Atoms) else list(atoms_list)
    model = EquiformerModel(checkpoint, device=device, dtype=dtype)
    pot, dev = model.potential, model.device
    timer = {"model": 0.0, "neighbours": 0.0, "calls": 0}

    def timed(fn, key: str):
        def run(*args, **kwargs):
            _sync(dev)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(dev)
            timer[key] += time.perf_counter() - start
            timer["calls"] += key == "model"
            return out

        return run

    model.forward, pot.edges = timed(model.forward, "model"), timed(pot.edges, "neighbours")
    state = ts.io.atoms_to_state(atoms_list, dev, model.dtype)
    dt = torch.tensor(timestep_fs * 1e-3 * MetalUnits.time, dtype=model.dtype, device=dev)
    kT = torch.tensor(temperature_K * MetalUnits.temperature, dtype=model.dtype, device=dev)
    init, update = ts.nve(model=model, dt=dt, kT=kT, seed=seed)
    s = init(state)
    for _ in range(warmup):
        s = update(s)
    timer.update(model=0.0, neighbours=0.0, calls=0)
    searches = pot.searches
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        s = update(s)
    _sync(dev)
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(s.positions).all()):
        raise RuntimeError("the benchmark's NVE run blew up (non-finite positions)")
    ns_per_day = steps * timestep_fs * 1e-6 / seconds * 86400.0
    return {"steps": steps, "n_systems": len(atoms_list), "atoms": int(s.n_atoms), "seconds": seconds,
            "model_seconds": timer["model"], "neighbour_seconds": timer["neighbours"], "evaluations": timer["calls"],
            "searches": pot.searches - searches, "ms_per_step": 1000.0 * seconds / steps, "ns_per_day": ns_per_day,
            "ns_per_day_aggregate": ns_per_day * len(atoms_list), "model_share": timer["model"] / seconds,
            "timestep_fs": timestep_fs, "device": str(dev),
            "detail": f"TorchSim {_version('torch-sim-atomistic')} nve (velocity Verlet), EquiformerModel: one forward "
                      "per step over all systems"}


# -- run, record, print ----------------------------------------------------------------------------


def _start_atoms():
    """Frame 0 of the shipped AT-AT (no velocities: TorchSim draws them)."""
    import numpy as np
    from ase import Atoms

    d = np.load(ATAT)
    return Atoms(numbers=d["z"], positions=d["R"][0])



def table(rows: list[dict]) -> str:
    head = (f"{'model':<28} {'dtype':<8} {'device':<7} {'K':>4} {'atoms':>6} {'ms/step':>9} {'ns/day/system':>13} "
            f"{'ns/day (all K)':>14} {'model %':>8} {'neigh. %':>8} {'searches/step':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<28} {r['dtype']:<8} {r['device']:<7} {r['n_systems']:>4} {r['atoms']:>6} "
                     f"{r['ms_per_step']:>9.1f} {r['ns_per_day']:>13.4f} {r['ns_per_day_aggregate']:>14.4f} "
                     f"{100 * r['model_share']:>7.1f}% {100 * r['neighbour_seconds'] / r['seconds']:>7.1f}% "
                     f"{r['searches'] / r['steps']:>13.3f}")
    return "\n".join(lines)


def _main(args) -> int:

    atoms = _start_atoms()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, info = model_of(args, Path(tmp))
        rows = []
        for k in args.systems:
            out = bench_torchsim(checkpoint, [atoms] * k, args.steps, args.timestep, warmup=args.warmup,
                                 device=args.device, dtype=args.dtype)
            rows.append({"engine": "torchsim", **info, **out})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    write_rows(args.out, rows, key=lambda r: (r["model"], r["dtype"], r["device"], r["n_systems"]), table=table,
               system="K copies of AT-AT, demo_data/AT-AT_xtb_500K_20frames.npz frame 0 (60 atoms each), "
                      "TorchSim NVE from 300 K")
    return 0


def main(argv=None) -> int:
    from scalable_equiformer.cli import ArgumentParser, exit_on_user_error, output_file, positive_int

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, steps=10)
    p.add_argument("--systems", type=positive_int, nargs="+", default=[1, 8, 32],
                   help="K: copies of AT-AT in one batch, one run per value (default 1 8 32)")
    p.add_argument("--out", type=output_file, default=Path("runs/bench_md_torchsim.json"),
                   help="JSON file (default runs/bench_md_torchsim.json)")
    args = p.parse_args(argv)
    return exit_on_user_error(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
