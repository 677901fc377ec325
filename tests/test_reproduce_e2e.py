"""tools/reproduce.py end to end: real train.py runs on real MD17 ethanol frames, then the table.

Quick mode (tiny model, 100 training frames, 2 epochs) with one molecule that trains and one whose
data file is absent: the table has a done row with the run's own test numbers and a failed row,
and the tool exits 1 instead of crashing. Removing ``results.json`` turns the row into ``running``
with the last validation metrics of the real ``metrics.csv``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalable_equiformer import reproduce as rp

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_md17_table_from_real_runs(tmp_path):
    if not rp.QUICK_DATA.is_file():
        pytest.fail(f"{rp.QUICK_DATA} missing: quick mode reads the real MD17 ethanol frames")
    out = tmp_path / "repro"
    empty = tmp_path / "no_data"
    empty.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools" / "reproduce.py"), "md17", "--quick", "--molecules", "ethanol",
           "aspirin", "--data-root", str(empty), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 1, log  # aspirin has no data file: failed row, exit 1, no traceback
    assert "Traceback" not in proc.stderr, log

    suite_dir = out / "md17_l2"
    results = json.loads((suite_dir / "ethanol_l2" / "results.json").read_text())
    summary = json.loads((suite_dir / "summary.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["ethanol_l2"]["status"] == "done"
    assert rows["ethanol_l2"]["energy_meV"] == pytest.approx(results["test_energy_mae_meV"])
    assert rows["ethanol_l2"]["force_meV_per_A"] == pytest.approx(results["test_force_mae_meV_per_A"])
    assert rows["ethanol_l2"]["n_test_frames"] == 100
    assert rows["aspirin_l2"]["status"] == "failed"
    assert "md17_aspirin" in (suite_dir / "aspirin_l2.log").read_text()  # the data error names the dataset

    table = (suite_dir / "table.md").read_text()
    e, f = results["test_energy_mae_meV"], results["test_force_mae_meV_per_A"]
    assert f"| Ethanol | {e:.2f} / {f:.2f} | 2.2 / 3.1 | {e / 2.2:.2f}× / {f / 3.1:.2f}× | done |" in table
    assert "| Aspirin | — / — | 5.3 / 7.2 | — / — | failed" in table
    assert table in proc.stdout
    assert (suite_dir / "bars.png").stat().st_size > 1000
    config = (suite_dir / "ethanol_l2" / "config.yaml").read_text()
    assert "md17_ethanol_2000_schnetpack.npz" in config and "max_epochs: 2" in config

    # a run still going: no results.json yet, metrics.csv there -> "running" with its last val metrics
    (suite_dir / "ethanol_l2" / "results.json").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "md17", "--molecules", "ethanol",
                           "--collect-only", "--out", str(out), "--no-plot"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((suite_dir / "summary.json").read_text())["rows"]
    assert row["status"] == "running" and row["epoch"] == 2 and row["force_meV_per_A"] > 0
    assert "running (last validation epoch 2)" in proc.stdout
