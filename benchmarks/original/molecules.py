#!/usr/bin/env python
"""Write the molecules of the side-by-side comparison (run with this project's venv):

    .venv/bin/python benchmarks/original/molecules.py OUT.npz

aspirin (frame 0 of the shipped GFN2-xTB aspirin run, 21 atoms, 318 edges at 5 Å) and the
synthetic AT-AT clusters of 60 and 120 atoms (``memory_profile.py --atoms 60/120``, 1,424 and
3,320 edges), as ``z_<name>`` and ``pos_<name>`` arrays, so that the original's step
(``step.py``, another venv) sees the same atoms.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scalable_equiformer.profiling import systems  # noqa: E402

out = {}
z, frames = systems.load_frames(systems.ASPIRIN_FILE, 1)
out["z_aspirin"], out["pos_aspirin"] = z, frames[0]
for n in (60, 120):
    z, pos = systems.synthetic_molecule(n)
    out[f"z_cluster{n}"], out[f"pos_cluster{n}"] = z, pos
np.savez(sys.argv[1], **out)
print(f"wrote {sys.argv[1]}: " + ", ".join(f"{k[2:]} {len(v)} atoms" for k, v in out.items() if k.startswith("z_")))
