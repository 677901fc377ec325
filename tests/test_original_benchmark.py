"""benchmarks/original/: the molecules both implementations are measured on, and the comparison
table (the original's own step needs its repository and e3nn 0.4.4, so it runs by hand: run.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from scalable_equiformer.profiling import systems

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "original"


def test_molecules_are_the_profilers_own(tmp_path):
    out = tmp_path / "m.npz"
    proc = subprocess.run([sys.executable, str(BENCH / "molecules.py"), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = np.load(out)
    assert {k for k in m.files if k.startswith("z_")} == {"z_aspirin", "z_cluster60", "z_cluster120"}
    z, pos = systems.synthetic_molecule(60)  # what memory_profile.py --atoms 60 measures
    np.testing.assert_array_equal(m["z_cluster60"], z)
    np.testing.assert_array_equal(m["pos_cluster60"], pos)
    edges = {k: systems.count_edges(m[f"pos_{k}"], 5.0) for k in ("aspirin", "cluster60", "cluster120")}
    assert edges == {"aspirin": 318, "cluster60": 1424, "cluster120": 3320}


def test_compare_table_matches_runs_by_atoms_and_edges(tmp_path):
    mib = 2**20
    orig = {"runs": [{"molecule": "aspirin", "atoms": 21, "edges": 318, "activation_bytes": 200 * mib,
                      "step_cpu_seconds": 2.0}]}
    this = {"runs": [{"atoms": 21, "edges": 318, "activation_bytes": 150 * mib, "step_cpu_seconds": 1.0}]}
    (tmp_path / "o.json").write_text(json.dumps(orig))
    (tmp_path / "t.json").write_text(json.dumps(this))
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), str(tmp_path / "o.json"),
                           str(tmp_path / "t.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| aspirin | 21 | 318 | 200.0 | 150.0 | 0.750 | 2.00 | 1.00 |" in proc.stdout
    this["runs"][0]["edges"] = 319  # another molecule: refused, not compared
    (tmp_path / "t.json").write_text(json.dumps(this))
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), str(tmp_path / "o.json"),
                           str(tmp_path / "t.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no original run with 21 atoms and 319 edges" in proc.stderr
