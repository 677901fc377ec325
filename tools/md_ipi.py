#!/usr/bin/env python
"""Run i-PI with a trained checkpoint: NVT (one bead) or PIMD (4 beads) of a shipped molecule.

    python tools/md_ipi.py --checkpoint runs/x/best.pt --mode nvt --steps 1000 --out runs/ipi_nvt
    python tools/md_ipi.py --checkpoint runs/x/best.pt --mode pimd --beads 4 --steps 1000 --out runs/ipi_pimd

Writes ``<out>/<molecule>.xyz`` (frame 0 of the shipped frames, a 100 Å box) and ``<out>/<mode>.xml``
(:func:`scalable_equiformer.md.ipi.input_xml`), starts the ``i-pi`` server on it and the client
``python -m scalable_equiformer.md.ipi`` on a UNIX socket, waits for both, and prints the last
line of ``<out>/<mode>.out`` (step, time, conserved quantity, temperature, potential in eV) and
the client's timing. The trajectory of the centroid is ``<out>/<mode>.pos.xyz`` (Å).
``--write-examples DIR`` writes the inputs of ``examples/ipi`` instead, to run by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="best.pt (or a run folder) of a train.py run")
    p.add_argument("--mode", choices=["nvt", "pimd"], default="nvt")
    p.add_argument("--molecule", choices=["atat", "aspirin"], default="atat", help="shipped molecule (frame 0)")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--beads", type=positive_int, default=4, help="beads of the ring polymer (pimd; default 4)")
    p.add_argument("--socket", default=None, help="UNIX socket name (default equiformer_<mode>_<pid>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="run folder (default runs/ipi_<mode>)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds before the run is stopped")
    p.add_argument("--write-examples", metavar="DIR", default=None,
                   help="only write the example inputs (xyz, nvt.xml, pimd.xml) into DIR")
    args = p.parse_args(argv)

    import os

    from scalable_equiformer.errors import UserError
    from scalable_equiformer.md import ipi

    try:
        if args.write_examples:
            for path in ipi.write_examples(args.write_examples, molecule=args.molecule).values():
                print(path)
            return 0
        if not args.checkpoint:
            raise UserError("--checkpoint is needed (best.pt of a train.py run)")
        if not Path(args.checkpoint).exists():
            raise UserError(f"--checkpoint {args.checkpoint}: no such file or folder")
        out = Path(args.out or f"runs/ipi_{args.mode}")
        out.mkdir(parents=True, exist_ok=True)
        numbers, positions = ipi.shipped_frame(args.molecule)
        xyz = ipi.write_structure(out / f"{args.molecule}.xyz", numbers, positions,
                                  title=f"frame 0 of scalable_equiformer/demo_data/{ipi.SHIPPED[args.molecule]}")
        name = args.socket or f"equiformer_{args.mode}_{os.getpid()}"
        xml = out / f"{args.mode}.xml"
        xml.write_text(ipi.input_xml(xyz.name, socket_name=name, mode=args.mode, steps=args.steps,
                                     timestep_fs=args.timestep, temperature_K=args.temperature, beads=args.beads,
                                     prefix=args.mode))
        stats = out / "client_timing.json"
        client = [sys.executable, "-m", "scalable_equiformer.md.ipi",
                  "--checkpoint", str(Path(args.checkpoint).resolve()),
                  "--structure", xyz.name, "--unix", name, "--device", args.device, "--stats", stats.name]
        result = ipi.run(xml.name, client_cmd=client, socket_name=name, workdir=out, timeout_s=args.timeout)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    props = ipi.read_properties(out / f"{args.mode}.out")
    timing = json.loads(stats.read_text())
    print(f"i-PI {args.mode.upper()} of {args.molecule}: {int(props['step'][-1])} steps of {args.timestep:g} fs in "
          f"{result['wall_s']:.1f} s; last: T = {props['temperature'][-1]:.1f} K, potential = "
          f"{props['potential'][-1]:.6f} eV, conserved = {props['conserved'][-1]:.6f} eV")
    print(f"client: {timing['requests']} force calls, {timing['ms_compute_per_call']:.2f} ms each in the model, "
          f"{timing['ms_between_replies']:.2f} ms between replies; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
