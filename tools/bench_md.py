#!/usr/bin/env python
"""MD speed of the trained potential in each engine: ns/day of the shipped AT-AT (60 atoms).

    python tools/bench_md.py --checkpoint runs/md22_atat/best.pt --steps 50
    python tools/bench_md.py --config md22_atat --steps 10        # the paper-size model, untrained weights
    python tools/bench_md.py --config tiny --engines openmm --dtype float64

The model: a training checkpoint (``--checkpoint``), or ``--config NAME`` built with the demo AT-AT
frames' statistics and untrained weights (the speed does not depend on the weights), written to a
temporary checkpoint so that every engine loads it as it loads a trained one.

Each engine runs NVE from frame 0 of ``demo_data/AT-AT_xtb_500K_20frames.npz`` (velocities at
300 K, seed 0) with ``--timestep`` fs: ``--warmup`` steps untimed, then ``--steps`` timed. Reported
per engine: ns/day, ms per step, the share of the step spent in the model's evaluation (the rest
is the engine's own overhead: integration, unit conversion, the calls between engine and model),
model evaluations and neighbour searches per step.

Engines (``ENGINES``: name -> function(checkpoint, atoms, steps, timestep_fs, **options) -> dict):
  ase     ASE VelocityVerlet + EquiformerCalculator (a neighbour search at every evaluation)
  openmm  openmm-ml createSystem + OpenMM VerletIntegrator (``--platform``, default CPU); the
          model behind an openmm.PythonForce (scalable_equiformer.md.Potential, Verlet list)
  ipi     the real i-pi server, NVT (SVR), the md.ipi client on a UNIX socket in this process
          (tools/bench_md_ipi.py: TCP with and without TCP_NODELAY too)
  torchsim  TorchSim velocity-Verlet NVE of the one molecule (tools/bench_md_torchsim.py: K at once)
An engine function returns at least ``steps``, ``seconds`` (the timed steps) and ``model_seconds``
(of which in the model's evaluation), ``evaluations`` and ``searches`` (neighbour searches); the
rest is derived here. Adding an engine is adding one such function to ``ENGINES``.

The results go to ``--out`` (JSON, default runs/bench_md.json): one row per (model, engine); rows
of an existing file for other models or engines are kept, so that runs add up. The table printed
at the end is the file's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # bench_md_ipi, bench_md_torchsim

ATAT = ROOT / "scalable_equiformer" / "demo_data" / "AT-AT_xtb_500K_20frames.npz"


def _start_atoms():
    """Frame 0 of the shipped AT-AT with Maxwell-Boltzmann velocities at 300 K (seed 0), no drift or spin."""
    import numpy as np
    from ase import Atoms
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    try:  # ASE >= 3.29
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # older ASE
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    d = np.load(ATAT)
    atoms = Atoms(numbers=d["z"], positions=d["R"][0])
    thermalize_momenta(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    return atoms


# -- engines -------------------------------------------------------------------------------------


def run_ase(checkpoint: Path, atoms, steps: int, timestep_fs: float, *, warmup: int = 2, device=None, dtype=None,
            **_) -> dict:
    """ASE VelocityVerlet with the EquiformerCalculator."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from scalable_equiformer.calculator import EquiformerCalculator

    calc = EquiformerCalculator(checkpoint, device=device, dtype=dtype)
    timer = {"seconds": 0.0, "calls": 0}
    calculate = calc.calculate

    def timed(*args, **kwargs):
        start = time.perf_counter()
        calculate(*args, **kwargs)
        timer["seconds"] += time.perf_counter() - start
        timer["calls"] += 1

    calc.calculate = timed
    atoms = atoms.copy()
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dyn.run(warmup)
    timer.update(seconds=0.0, calls=0)
    start = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "model_seconds": timer["seconds"], "evaluations": timer["calls"],
            "searches": timer["calls"], "detail": "ASE VelocityVerlet, EquiformerCalculator"}


def run_openmm(checkpoint: Path, atoms, steps: int, timestep_fs: float, *, warmup: int = 2, device=None, dtype=None,
               platform_name: str = "CPU", **_) -> dict:
    """openmm-ml createSystem + VerletIntegrator; the model behind a PythonForce."""
    import numpy as np
    import openmm
    import openmm.unit as unit
    from openmmml import MLPotential

    from scalable_equiformer.md.openmm import topology_from_numbers

    mlp = MLPotential("equiformer", checkpoint=str(checkpoint), device=device, dtype=dtype)
    system = mlp.createSystem(topology_from_numbers(atoms.numbers), removeCMMotion=False)
    integrator = openmm.VerletIntegrator(timestep_fs * unit.femtosecond)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform_name))
    ctx.setPositions(np.asarray(atoms.positions) * unit.angstrom)
    ctx.setVelocities(np.asarray(atoms.get_velocities()) * (unit.angstrom / _ase_time_unit()))
    force = mlp._impl.forces[-1]
    integrator.step(warmup)
    calls, searches, model = force.calls, force.potential.searches, force.seconds
    start = time.perf_counter()
    integrator.step(steps)
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "model_seconds": force.seconds - model,
            "evaluations": force.calls - calls, "searches": force.potential.searches - searches,
            "detail": f"OpenMM {openmm.__version__} {platform_name} platform, VerletIntegrator, PythonForce"}


def _ase_time_unit():
    """ASE's time unit (Å sqrt(amu/eV)) as an OpenMM unit, for ASE velocities in Å per ASE time."""
    import openmm.unit as unit
    from ase import units

    return (1.0 / units.fs) * unit.femtosecond


def run_ipi(checkpoint: Path, atoms, steps: int, timestep_fs: float, *, device=None, dtype=None, **_) -> dict:
    """i-PI NVT (SVR) over a UNIX socket, the client in this process (``tools/bench_md_ipi.py``,
    which also times TCP with and without TCP_NODELAY). i-PI times from its first force call, so no
    warm-up steps are run."""
    from bench_md_ipi import bench_ipi

    out = bench_ipi(checkpoint, atoms, steps, timestep_fs, device=device or "cpu", dtype=dtype)
    return {"steps": steps, "seconds": out["ms_per_step"] * steps / 1e3,
            "model_seconds": out["ms_compute_per_step"] * steps / 1e3, "evaluations": out["force_calls"] - 1,
            "searches": out["neighbour_searches"], "detail": "i-PI NVT (SVR thermostat), UNIX socket, md.ipi client"}


def run_torchsim(checkpoint: Path, atoms, steps: int, timestep_fs: float, *, warmup: int = 2, device=None, dtype=None,
                 **_) -> dict:
    """TorchSim velocity-Verlet NVE of the one molecule (``tools/bench_md_torchsim.py`` runs batches of K)."""
    from bench_md_torchsim import bench_torchsim

    out = bench_torchsim(checkpoint, [atoms], steps, timestep_fs, warmup=warmup, device=device, dtype=dtype)
    return {k: out[k] for k in ("steps", "seconds", "model_seconds", "evaluations", "searches", "detail")}


#: engine name -> function(checkpoint, atoms, steps, timestep_fs, **options) -> dict (see the docstring)
ENGINES: dict[str, Callable[..., dict]] = {"ase": run_ase, "openmm": run_openmm, "ipi": run_ipi,
                                           "torchsim": run_torchsim}


# -- the model -----------------------------------------------------------------------------------


def config_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint of ``configs/<name>``'s model with untrained weights and the demo AT-AT's statistics."""
    import torch

    from scalable_equiformer import build_model, load_config
    from scalable_equiformer.data import load_dataset
    from scalable_equiformer.data.statistics import compute_statistics
    from scalable_equiformer.training.checkpoint import save_checkpoint

    cfg = load_config(name, [f"data.path={ATAT}"])
    data = load_dataset(ATAT)
    stats = compute_statistics(data, cfg.model.cutoff)
    torch.manual_seed(0)
    model = build_model(cfg, stats)
    path = folder / f"{Path(name).stem}_untrained.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "stats": stats.to_dict(), "model": model.state_dict(), "epoch": 0,
                           "elements": sorted({int(z) for z in data[0].z.tolist()})})
    return path


def _model_info(checkpoint: Path, label: str, dtype) -> dict:
    from scalable_equiformer.inference import load_model

    model, cfg, _ = load_model(checkpoint, device="cpu", dtype=dtype)
    return {"model": label, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(model.dtype).split(".")[-1], "smooth_cutoff": bool(getattr(model, "smooth_cutoff", True)),
            "cutoff_A": float(model.cutoff)}


# -- run, record, print ----------------------------------------------------------------------------


def derive(row: dict, timestep_fs: float) -> dict:
    s, n = row["seconds"], row["steps"]
    row.update(ns_per_day=n * timestep_fs * 1e-6 / s * 86400.0, ms_per_step=1000.0 * s / n,
               model_share=row["model_seconds"] / s, evaluations_per_step=row["evaluations"] / n,
               searches_per_step=row["searches"] / n, timestep_fs=timestep_fs)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'model':<28} {'dtype':<8} {'engine':<8} {'ns/day':>8} {'ms/step':>9} {'model %':>8} "
            f"{'evals/step':>10} {'searches/step':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<28} {r['dtype']:<8} {r['engine']:<8} {r['ns_per_day']:>8.4f} "
                     f"{r['ms_per_step']:>9.1f} {100 * r['model_share']:>7.1f}% {r['evaluations_per_step']:>10.2f} "
                     f"{r['searches_per_step']:>13.3f}")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def write_rows(out: Path, rows: list[dict], *, key: Callable[[dict], tuple], table: Callable[[list], str],
               system: str) -> None:
    """Add ``rows`` to the JSON file ``out`` (rows of other ``key``s kept, so runs add up) and print its table."""
    old = json.loads(out.read_text()) if out.is_file() else {}
    new = {key(r) for r in rows}
    kept = [r for r in old.get("rows", []) if key(r) not in new]
    result = {"system": system, "machine": machine(), "rows": kept + rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(result["rows"]))
    print(f"\nwrote {out}")


def add_model_arguments(p, steps: int) -> None:
    """The options every MD benchmark takes: the model (checkpoint or config), steps, precision, device."""
    from scalable_equiformer.cli import nonnegative_int, positive_float, positive_int

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a training checkpoint (best.pt) or run folder")
    src.add_argument("--config", help="a config name or file: its model with untrained weights (e.g. md22_atat, tiny)")
    p.add_argument("--label", default=None,
                   help="the model's name in the table (default: run folder/file, or the config)")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"timed MD steps per run (default {steps})")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--timestep", type=positive_float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="the model's precision (default: as stored)")
    p.add_argument("--device", default="cpu", help="the model's device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")


def model_of(args, tmp: Path) -> tuple[Path, dict]:
    """(checkpoint, model info) of the options of :func:`add_model_arguments`; ``--threads`` applied."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint is not None:
        label = args.label or f"{args.checkpoint.resolve().parent.name}/{args.checkpoint.name}"
        return args.checkpoint, _model_info(args.checkpoint, label, args.dtype)
    checkpoint = config_checkpoint(args.config, tmp)
    return checkpoint, _model_info(checkpoint, args.label or f"{args.config} (untrained)", args.dtype)


def _main(args) -> int:

    from scalable_equiformer.errors import UserError

    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        raise UserError(f"--engines: unknown engine {unknown[0]} (known: {', '.join(ENGINES)})")
    atoms = _start_atoms()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, info = model_of(args, Path(tmp))
        rows = []
        for name in args.engines:
            out = ENGINES[name](checkpoint, atoms, args.steps, args.timestep, warmup=args.warmup, device=args.device,
                                dtype=args.dtype, platform_name=args.platform)
            rows.append(derive({"engine": name, **info, "atoms": len(atoms), **out}, args.timestep))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    write_rows(args.out, rows, key=lambda r: (r["model"], r["dtype"], r["engine"]), table=table,
               system="AT-AT, demo_data/AT-AT_xtb_500K_20frames.npz frame 0 (60 atoms), NVE from 300 K")
    return 0


def main(argv=None) -> int:
    from scalable_equiformer.cli import ArgumentParser, exit_on_user_error, output_file

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, steps=20)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), help=f"engines to run (default: {' '.join(ENGINES)})")
    p.add_argument("--platform", choices=("CPU", "Reference", "CUDA", "OpenCL"), default="CPU",
                   help="OpenMM platform of the openmm engine (default CPU)")
    p.add_argument("--out", type=output_file, default=Path("runs/bench_md.json"),
                   help="JSON file (default runs/bench_md.json)")
    args = p.parse_args(argv)
    return exit_on_user_error(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
