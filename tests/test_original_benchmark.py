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


def test_speed_table_medians_over_rounds_and_ratios_against_the_original(tmp_path):
    def write(name, impl, train, infer):
        run = {"molecule": "aspirin", "atoms": 21, "edges": 318, "train_cpu_s": train, "train_wall_s": train,
               "infer_cpu_s": infer, "infer_wall_s": infer}
        (tmp_path / name).write_text(json.dumps({"implementation": impl, "runs": [run]}))
        return str(tmp_path / name)

    files = [
        write("r1_o.json", "original", [1.0, 1.2], [0.4, 0.4]),
        write("r2_o.json", "original", [1.4, 5.0], [0.4, 0.4]),
        write("r1_n.json", "this, levers off", [0.5, 0.6], [0.2, 0.2]),
        write("r2_n.json", "this, levers off", [0.7, 9.0], [0.1, 0.1]),
        write("r1_f.json", "this, checkpointing=forces", [1.3, 1.3], [0.3, 0.3]),
    ]
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), "--speed", *files, "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # medians over all timed steps of all rounds: original 1.3, levers off 0.65, forces 1.3
    assert "| aspirin | 21 | 318 | 1.300 s | 0.650 s (2.00x) | 1.300 s (1.00x) | 4/4/2 |" in proc.stdout
    assert "| aspirin | 21 | 318 | 0.400 s | 0.150 s (2.67x) | 0.300 s (1.33x) | 4/4/2 |" in proc.stdout
    s = json.loads(out.read_text())["molecules"]["aspirin"]
    assert (
        abs(s["original"]["train"]["median_cpu_s"] - 1.3) < 1e-12
        and s["this, levers off"]["infer"]["cpu_s"] == [0.2, 0.2, 0.1, 0.1]
    )


def test_speed_table_has_a_before_column_when_given(tmp_path):
    files = []
    for impl, t in (("original", 2.0), ("before, levers off", 1.0), ("this, levers off", 0.5)):
        run = {"molecule": "aspirin", "atoms": 21, "edges": 318, "train_cpu_s": [t], "train_wall_s": [t],
               "infer_cpu_s": [t], "infer_wall_s": [t]}
        files.append(tmp_path / f"{len(files)}.json")
        files[-1].write_text(json.dumps({"implementation": impl, "runs": [run]}))
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), "--speed", *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| molecule | atoms | edges | original | before, levers off | this, levers off | samples |" in proc.stdout
    assert "| aspirin | 21 | 318 | 2.000 s | 1.000 s (2.00x) | 0.500 s (4.00x) | 1/1/1 |" in proc.stdout
