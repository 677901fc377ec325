"""tools/reproduce.py end to end: real train.py runs on the shipped aspirin xTB frames, then the table.

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

from helpers import load_tool

rp = load_tool("reproduce")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_md17_table_from_real_runs(tmp_path):
    if not rp.QUICK_DATA.is_file():
        pytest.fail(f"{rp.QUICK_DATA} missing: quick mode reads the aspirin frames shipped in the package")
    out = tmp_path / "repro"
    empty = tmp_path / "no_data"
    empty.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools" / "reproduce.py"), "md17", "--quick", "--molecules", "aspirin",
           "ethanol", "--data-root", str(empty), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 1, log  # ethanol has no data file: failed row, exit 1, no traceback
    assert "Traceback" not in proc.stderr, log

    suite_dir = out / "md17_l2"
    results = json.loads((suite_dir / "aspirin_l2" / "results.json").read_text())
    summary = json.loads((suite_dir / "summary.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["aspirin_l2"]["status"] == "done"
    assert rows["aspirin_l2"]["energy_meV"] == pytest.approx(results["test_energy_mae_meV"])
    assert rows["aspirin_l2"]["force_meV_per_A"] == pytest.approx(results["test_force_mae_meV_per_A"])
    assert rows["aspirin_l2"]["n_test_frames"] == 100
    assert rows["ethanol_l2"]["status"] == "failed"
    assert "md17_ethanol" in (suite_dir / "ethanol_l2.log").read_text()  # the data error names the dataset

    table = (suite_dir / "table.md").read_text()
    e, f = results["test_energy_mae_meV"], results["test_force_mae_meV_per_A"]
    assert f"| Aspirin | {e:.2f} / {f:.2f} | 5.3 / 7.2 | {e / 5.3:.2f}× / {f / 7.2:.2f}× | done |" in table
    assert "| Ethanol | — / — | 2.2 / 3.1 | — / — | failed" in table
    assert "GFN2-xTB" in table  # the quick note says the data is not MD17's
    assert table in proc.stdout
    assert (suite_dir / "bars.png").stat().st_size > 1000
    config = (suite_dir / "aspirin_l2" / "config.yaml").read_text()
    assert "demo_data/aspirin_xtb_500K.npz" in config and "max_epochs: 2" in config

    # a run still going: no results.json yet, metrics.csv there -> "running" with its last val metrics
    (suite_dir / "aspirin_l2" / "results.json").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "md17", "--molecules", "aspirin",
                           "--collect-only", "--out", str(out), "--no-plot"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((suite_dir / "summary.json").read_text())["rows"]
    assert row["status"] == "running" and row["epoch"] == 2 and row["force_meV_per_A"] > 0
    assert "running (last validation epoch 2)" in proc.stdout
