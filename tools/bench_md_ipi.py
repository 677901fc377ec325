#!/usr/bin/env python
"""ns/day of NVT MD through i-PI: the real ``i-pi`` server and the client of
:mod:`scalable_equiformer.md.ipi` on one molecule (default: the shipped AT-AT, 60 atoms).

    python tools/bench_md_ipi.py --checkpoint runs/x/best.pt --steps 200 --json runs/bench_md_ipi.json
    python tools/bench_md_ipi.py --checkpoint runs/x/best.pt --transport tcp tcp-nagle unix

The client runs in this process (so its timers are read directly); i-PI is its own process, as in
a user's run. Timed: from the first forces sent to i-PI to the last, ``steps`` steps of NVT (SVR
thermostat); i-PI's start-up and the first force call are not. Reported per step: milliseconds,
ns/day at ``--timestep``, the milliseconds inside ``Potential.compute`` (the model and its
neighbour list) and the rest (the socket, i-PI's integrator, thermostat and output: every step
writes a properties line). ``--transport tcp-nagle`` is TCP without ``TCP_NODELAY`` (ASE's
SocketClient), to show what it costs. Timings on a shared machine vary; repeat for a spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_ipi(checkpoint, atoms=None, steps: int = 100, timestep_fs: float = 0.5, *, temperature_K: float = 300.0,
              transport: str = "unix", device: str = "auto", dtype=None, timeout_s: float = 3600.0) -> dict:
    """Time ``steps`` NVT steps of ``atoms`` (an ASE Atoms; None = the shipped AT-AT frame 0)
    through i-PI with ``checkpoint``; ``transport``: "unix", "tcp" (TCP_NODELAY) or "tcp-nagle".

    Returns a dict: ns_per_day, ms_per_step, steps, ms_compute_per_step (inside Potential.compute),
    ms_other_per_step (socket + i-PI), compute_share (compute / step), neighbour_searches,
    force_calls, atoms, timestep_fs, transport, device."""
    from scalable_equiformer.errors import UserError
    from scalable_equiformer.md import ipi
    from scalable_equiformer.runtime import free_port

    if transport not in ("unix", "tcp", "tcp-nagle"):
        raise UserError(f"transport must be unix, tcp or tcp-nagle, not {transport!r}")
    if int(steps) < 1:
        raise UserError(f"steps must be >= 1, not {steps}")
    if atoms is None:
        numbers, positions = ipi.shipped_frame("atat")
    else:
        numbers, positions = atoms.numbers, atoms.positions
    with tempfile.TemporaryDirectory(prefix="bench_md_ipi_") as tmp:
        work = Path(tmp)
        xyz = ipi.write_structure(work / "molecule.xyz", numbers, positions)
        name = f"bench_{os.getpid()}"
        port = None if transport == "unix" else free_port()
        # properties every step (what a user's run writes), the trajectory rarely
        xml = ipi.input_xml(xyz.name, socket_name=name, steps=int(steps), timestep_fs=timestep_fs,
                            temperature_K=temperature_K, prefix="nvt", stride=max(1, int(steps)), tcp_port=port)
        (work / "nvt.xml").write_text(xml)
        driver = ipi.EquiformerDriver.from_files(checkpoint, xyz, device=device, dtype=dtype)
        result = ipi.run("nvt.xml", driver=driver, socket_name=name, workdir=work, timeout_s=timeout_s, tcp_port=port,
                         nodelay=transport != "tcp-nagle")
    client = result["client"]
    if client.requests != int(steps) + 1:
        raise UserError(f"i-PI asked for {client.requests} force calls for {steps} NVT steps "
                        f"(expected {int(steps) + 1})")
    ms_step = 1e3 * (client.last_reply - client.first_reply) / int(steps)
    # the timed interval (first reply to last) holds the force calls after the first
    ms_compute = 1e3 * (driver.compute_s - driver.first_compute_s) / (driver.calls - 1)
    return {"ns_per_day": timestep_fs * 1e-6 * 86400e3 / ms_step, "ms_per_step": ms_step, "steps": int(steps),
            "ms_compute_per_step": ms_compute, "ms_other_per_step": ms_step - ms_compute,
            "compute_share": ms_compute / ms_step, "neighbour_searches": driver.potential.searches,
            "force_calls": client.requests, "atoms": int(len(numbers)), "timestep_fs": float(timestep_fs),
            "transport": transport, "device": str(driver.potential.device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="best.pt (or a run folder) of a train.py run")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--structure", default=None, help="a molecule (xyz/PDB) instead of the shipped AT-AT")
    p.add_argument("--transport", nargs="+", default=["unix"], choices=["unix", "tcp", "tcp-nagle"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)

    import torch

    from scalable_equiformer.errors import UserError

    try:
        atoms = None
        if args.structure:
            import ase.io

            from scalable_equiformer.md.ipi import read_structure

            read_structure(args.structure)  # one-line errors for a bad file
            atoms = ase.io.read(args.structure)
        runs = [bench_ipi(args.checkpoint, atoms, args.steps, args.timestep, transport=t, device=args.device)
                for t in args.transport]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'transport':>10} {'ns/day':>8} {'ms/step':>8} {'model ms':>9} {'other ms':>9} {'model share':>11}")
    for r in runs:
        print(f"{r['transport']:>10} {r['ns_per_day']:8.3f} {r['ms_per_step']:8.2f} {r['ms_compute_per_step']:9.2f} "
              f"{r['ms_other_per_step']:9.2f} {100 * r['compute_share']:10.1f}%")
    if args.json:
        out = {"engine": "i-PI", "checkpoint": str(args.checkpoint), "host": platform.node(),
               "cpu_threads": torch.get_num_threads(), "runs": runs}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
