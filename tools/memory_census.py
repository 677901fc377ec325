#!/usr/bin/env python
"""What a training step keeps for the force loss, per autograd op, against the estimate.

    python tools/memory_census.py --config md17_aspirin --data scalable_equiformer/demo_data/aspirin_xtb_500K.npz
    python tools/memory_census.py --config md17_aspirin --atoms 60 --top 15 --json census.json

Runs energy and forces (``create_graph=True``, training mode) once and counts every distinct
storage that the two graphs keep, charged to the autograd op that saved it (``F``: forward graph
of the energy; ``B``: the force computation, which ``loss.backward()`` differentiates through),
grouped by size per edge (:mod:`scalable_equiformer.profiling.census`). The last lines set the
total against the activation estimate of ``profiling/estimate.py`` for the same molecule
(levers off). Levers off only: reading a node's saved tensors inside a checkpointed region
would recompute them (``memory_profile.py`` measures the levers). Memory in MiB; the molecule is
frame 0 of ``--data`` or a synthetic one of ``--atoms`` atoms (AT-AT copies at real density, as
``memory_profile.py --atoms``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2**20


def main(argv=None) -> int:
    from scalable_equiformer.cli import ArgumentParser, add_set_argument, output_file, positive_int  # noqa: PLC0415

    ap = ArgumentParser(prog="tools/memory_census.py",
                        description="Tensors kept for the force loss, per autograd op, against the estimate.")
    ap.add_argument("--config", default="md17_aspirin", help="YAML path or name in configs/ (default md17_aspirin)")
    add_set_argument(ap, dest="set", help="config overrides (repeatable)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", help="data file (sGDML npz, rMD17 npz, extxyz): frame 0")
    src.add_argument("--atoms", type=positive_int, help="synthetic molecule of N atoms (default 21 without --data)")
    ap.add_argument("--top", type=positive_int, default=25, help="rows to print (default 25)")
    ap.add_argument("--json", type=output_file, help="write the census as JSON to this file")
    args = ap.parse_args(argv)

    from scalable_equiformer.errors import UserError  # noqa: PLC0415

    try:
        return _run(args)
    except UserError as exc:
        print(f"tools/memory_census.py: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from scalable_equiformer.config import load_config  # noqa: PLC0415
    from scalable_equiformer.profiling import estimate, measured_step, systems  # noqa: PLC0415
    from scalable_equiformer.profiling.census import model_census  # noqa: PLC0415

    cfg = load_config(args.config, list(args.set))
    if args.data:
        z, frames = systems.load_frames(args.data, 1)
        pos = frames[0]
    else:
        z, pos = systems.synthetic_molecule(args.atoms or 21)
    torch.manual_seed(0)
    model, dtype = measured_step.build(cfg, torch.device("cpu"), len(z))
    batch = measured_step.make_batch(np.asarray(z), np.asarray(pos)[None], dtype, "cpu")
    census = model_census(model, batch)
    e, n = census.edges, census.atoms

    print(f"config {args.config}  atoms {n}  edges {e}  dtype {cfg.model.dtype}")
    print(f"{'graph':5s} {'op':32s} {'floats/edge':>11s} {'count':>5s} {'MiB':>9s} {'share':>6s}")
    for r in census.rows[: args.top]:
        print(f"{r.graph:5s} {r.op:32s} {r.floats_per_edge:11.1f} {r.count:5d} {r.bytes / MiB:9.2f} "
              f"{r.bytes / census.bytes:6.1%}")
    if len(census.rows) > args.top:
        rest = sum(r.bytes for r in census.rows[args.top:])
        more = "(" + str(len(census.rows) - args.top) + " more rows)"
        print(f"{'':5s} {more:32s} {'':11s} {'':5s} {rest / MiB:9.2f} {rest / census.bytes:6.1%}")
    print("by op: " + ", ".join(f"{k} {v / MiB:.1f}" for k, v in list(census.by_op().items())[:8]))
    est_bytes = estimate.activation_profile(cfg).plain(e, n)
    print(f"census {census.bytes / MiB:.1f} MiB = {census.bytes / e / MiB:.3f} MiB/edge;  "
          f"estimate (profiling/estimate.py, before calibration) {est_bytes / MiB:.1f} MiB")
    if args.json:
        out = {"config": args.config, "estimate_bytes": est_bytes, **census.as_dict()}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
