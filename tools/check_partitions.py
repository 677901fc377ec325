#!/usr/bin/env python
"""Check that the partitioned model equals the single-process model.

    python tools/check_partitions.py --config CONFIG --data FILE --partitions P [--frames K]

spawns P gloo processes on this machine (CPU), runs one training-mode step of the same weights
partitioned over them and in one process, prints the largest relative errors of energies, forces
and parameter gradients, and exits with status 1 past the tolerance (1e-9 in float64, 1e-5 in
float32; ``--dtype`` overrides the model's). ``--frames K`` takes the first K frames of FILE as one
batch; ``--tile AxBxC`` replaces each frame by an A x B x C grid of copies ``--gap`` Å apart;
``--tiny`` swaps the config's model for the tiny one. Without ``--config`` the tiny model is used.
The comparison itself (and what the errors mean) is ``tools/partition_harness.py``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness: tools/partition_harness.py

from partition_harness import (  # noqa: E402
    build_checked_model,
    check,
    load_frames,
    make_system,
    parse_tile,
    tile_system,
    tiny_model_config,
)
from scalable_equiformer.data.statistics import count_edges  # noqa: E402


def main(argv=None) -> int:
    from scalable_equiformer.cli import (  # noqa: PLC0415
        ArgumentParser, add_set_argument, nonnegative_float, output_file, positive_float, positive_int, tile_spec,
    )

    ap = ArgumentParser(
        prog="tools/check_partitions.py",
        description="Partitioned model vs single process: energies (eV), forces (eV/Å), parameter gradients.",
    )
    ap.add_argument("--config", help="YAML path or name in configs/ (its model section); default: tiny model")
    ap.add_argument("--data", required=True, help="data file (sGDML npz, ...) or catalog name")
    ap.add_argument("--partitions", "-P", type=positive_int, required=True)
    ap.add_argument("--frames", type=positive_int, default=1, help="first K >= 1 frames, as one batch")
    ap.add_argument("--tile", type=tile_spec, help="AxBxC copies of each frame (a large system), e.g. 3x3x2")
    ap.add_argument("--gap", type=nonnegative_float, default=2.0, help="Å between tiled copies")
    ap.add_argument("--tiny", action="store_true", help="use the tiny model (cutoff etc. from the config)")
    ap.add_argument("--dtype", choices=["float32", "float64"])
    add_set_argument(ap, dest="set", help="config overrides (repeatable)")
    ap.add_argument("--tolerance", type=positive_float)
    ap.add_argument("--json", type=output_file, help="write the report to this file")
    args = ap.parse_args(argv)
    from scalable_equiformer.errors import UserError  # noqa: PLC0415

    try:
        if args.partitions < 1:
            raise UserError("--partitions must be >= 1")
        overrides = {}
        if args.config:
            from scalable_equiformer.config import load_config  # noqa: PLC0415

            sets = list(args.set)
            if not any(s.startswith(("data.path=", "data.name=")) for s in sets):
                sets.append(f"data.path={args.data}")
            mcfg = load_config(args.config, sets).model
            if args.tiny:
                keep = {k: getattr(mcfg, k) for k in ("cutoff", "attention", "message", "radial_basis", "dtype")}
                mcfg = tiny_model_config(**keep)
        else:
            mcfg = tiny_model_config()
        if args.dtype:
            overrides["dtype"] = args.dtype
        frames = load_frames(args.data, args.frames)
        if mcfg.avg_num_neighbors is None or mcfg.avg_num_atoms is None:
            n = sum(p.shape[0] for p, _ in frames)
            e = sum(count_edges(p, mcfg.cutoff) for p, _ in frames)
            overrides.setdefault("avg_num_neighbors", mcfg.avg_num_neighbors or e / n)
            overrides.setdefault("avg_num_atoms", mcfg.avg_num_atoms or n / len(frames))
        mcfg = dataclasses.replace(mcfg, **overrides)
        reps = parse_tile(args.tile)
        if reps:
            frames = [tile_system(p, z, reps, args.gap) for p, z in frames]
        name = Path(str(args.data)).stem + (f"_x{args.tile}" if reps else "") + f"_{len(frames)}f"
        system = make_system(name, frames, eval=True)
        model = build_checked_model(mcfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, {model.dtype}, cutoff {model.cutoff} Å")
    report = check(model, [system], args.partitions, tolerance=args.tolerance)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("OK" if report["ok"] else "FAILED: past tolerance or edges not covered exactly once")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
