"""tools/reproduce.py: suites, launching, collecting run folders in any state, table and plot.

These tests write synthetic run folders; ``test_reproduce_e2e.py`` trains for real.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from helpers import load_tool
from scalable_equiformer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


rp = load_tool("reproduce")


def _tool():
    return rp


def write_results(folder: Path, e_meV: float, f_meV: float, n_test: int = 100) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    k = rp.KCAL_PER_EV / 1000.0
    (folder / "results.json").write_text(json.dumps({
        "test_energy_mae_meV": e_meV, "test_force_mae_meV_per_A": f_meV,
        "test_energy_mae_kcal_per_mol": e_meV * k, "test_force_mae_kcal_per_mol_per_A": f_meV * k,
        "n_test_frames": n_test, "checkpoint": str(folder / "best.pt")}))


def write_metrics(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["epoch", "step", "lr", "train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A"]
    with open(folder / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})


def test_paper_tables_are_complete_and_match_the_paper():
    for lmax in (2, 3):
        assert set(rp.PAPER_MD17[lmax]) == set(rp.MD17_MOLECULES)
    assert rp.PAPER_MD17[2]["aspirin"] == (5.3, 7.2)
    assert rp.PAPER_MD17[2]["naphthalene"] == (3.7, 2.1)
    assert rp.PAPER_MD17[3]["benzene"] == (2.5, 8.1)
    assert rp.PAPER_MD17[3]["uracil"] == (4.3, 3.4)
    assert [v[2] for v in rp.ABLATION.values()] == [(5.4, 7.2), (5.4, 8.2), (5.8, 9.2)]
    assert len(rp.MD22_SYSTEMS) == 7
    # MD22 paper numbers are either sourced or absent, never silent
    assert rp.PAPER_MD22 == {} or rp.MD22_PAPER_SOURCE


def test_suites_name_configs_and_runs():
    s = rp.md17_suite()
    assert [r.config for r in s.runs][:2] == ["md17_aspirin", "md17_benzene"] and len(s.runs) == 8
    s3 = rp.md17_suite(["Aspirin", "salicylic_acid"], lmax=3)
    assert [(r.key, r.config, r.paper) for r in s3.runs] == [
        ("aspirin_l3", "md17_aspirin_l3", (5.3, 6.6)), ("salicylic_l3", "md17_salicylic_l3", (4.3, 3.9))]
    ab = rp.md17_suite(ablation=True)
    assert {r.config for r in ab.runs} == {"md17_aspirin"}
    assert ab.runs[2].overrides == ["model.message=linear", "model.attention=dot"]
    m = rp.md22_suite(["AT-AT", "nanotube"])
    assert [(r.config, r.num_atoms) for r in m.runs] == [("md22_atat", 60), ("md22_nanotube", 370)]
    with pytest.raises(UserError, match="unknown MD17 molecule"):
        rp.md17_suite(["caffeine"])
    with pytest.raises(UserError):
        rp.md17_suite(lmax=3, ablation=True)


def test_options_order_user_set_wins_last(tmp_path):
    s = rp.apply_options(rp.md17_suite(["aspirin", "ethanol"]), epochs=5, data_root="/d", quick=True,
                         quick_data=tmp_path / "a.npz", extra=["train.max_epochs=7"])
    sets = s.runs[0].overrides
    assert sets.index("train.max_epochs=2") < sets.index("train.max_epochs=5") < sets.index("train.max_epochs=7")
    assert f"data.path={tmp_path / 'a.npz'}" in sets and "data.root=/d" in sets
    assert not any(x.startswith("data.path=") for x in s.runs[1].overrides)  # ethanol: its catalog file
    cmd = rp.train_command(s.runs[0], tmp_path / "md17_l2")
    assert cmd[1].endswith("train.py") and cmd[2:4] == ["--config", "md17_aspirin"]
    assert cmd[-4:] == ["--set", f"train.out_dir={tmp_path / 'md17_l2'}", "--set", "train.run_name=aspirin_l2"]
    default = rp.apply_options(rp.md17_suite(["aspirin"]), quick=True)  # the data shipped in the package
    assert f"data.path={rp.QUICK_DATA}" in default.runs[0].overrides and rp.QUICK_DATA.is_file()
    assert "shared" not in rp.QUICK_DATA.parts
    ds = rp.train_command(s.runs[0], tmp_path, launcher="deepspeed", nproc=2)
    assert ds[:3] == ["deepspeed", "--num_gpus", "2"]


def test_partial_runs_give_a_partial_table(tmp_path):
    suite = rp.md17_suite(["aspirin", "ethanol", "toluene", "uracil"])
    d = tmp_path / suite.name
    write_results(d / "aspirin_l2", 10.6, 7.2)
    write_metrics(d / "ethanol_l2", [
        {"epoch": 1, "step": 10, "train_loss": 1.0, "val_energy_mae_meV": 50.0, "val_force_mae_meV_per_A": 40.0},
        {"epoch": 2, "step": 20, "train_loss": 0.5},  # a training-loss row without validation
    ])
    (d / "uracil_l2").mkdir(parents=True)
    (d / "uracil_l2" / "results.json").write_text("{not json")
    rows = rp.collect(suite, tmp_path, exit_codes={"toluene_l2": 1})
    by = {r.key: r for r in rows}
    assert by["aspirin_l2"].status == "done" and by["aspirin_l2"].energy_meV == 10.6
    assert by["ethanol_l2"].status == "running" and by["ethanol_l2"].force_meV_per_A == 40.0
    assert by["ethanol_l2"].epoch == 1
    assert by["toluene_l2"].status == "failed" and by["uracil_l2"].status == "failed"
    table = rp.markdown_table(suite, rows)
    assert "| Aspirin | 10.60 / 7.20 | 5.3 / 7.2 | 2.00× / 1.00× | done |" in table
    assert "| Ethanol | 50.00 / 40.00 | 2.2 / 3.1 |" in table and "running (last validation epoch 1)" in table
    assert "| Toluene | — / — | 3.8 / 2.1 | — / — | failed" in table
    assert "1 of 4 runs finished" in table and "meV" in table
    paths = rp.write_report(suite, rows, tmp_path)
    assert paths["plot"].stat().st_size > 1000
    summary = json.loads(paths["summary"].read_text())
    assert [r["status"] for r in summary["rows"]] == ["done", "running", "failed", "failed"]


def test_md22_units_per_atom_and_kcal(tmp_path):
    suite = rp.md22_suite(["atat"])
    write_results(tmp_path / "md22" / "atat", e_meV=60.0, f_meV=10.0)
    (row,) = rp.collect(suite, tmp_path)
    u = rp.md22_units(row)
    assert u["energy_meV_per_atom"] == pytest.approx(1.0)
    assert u["energy_kcal_per_mol"] == pytest.approx(60.0e-3 * 23.060547830619026)
    assert u["force_kcal_per_mol_per_A"] == pytest.approx(10.0e-3 * 23.060547830619026)
    table = rp.markdown_table(suite, [row])
    assert "| AT-AT | 60 | 1.000 / 10.000 | 1.384 / 0.231 | — / — |" in table
    assert rp.MD22_PAPER_NOTE in table


def test_launch_continues_after_a_failed_run(tmp_path, monkeypatch):
    """A run that crashes leaves a 'failed' row; the next run still trains; done runs are skipped."""
    suite = rp.md17_suite(["aspirin", "benzene", "ethanol"])
    write_results(tmp_path / suite.name / "ethanol_l2", 3.0, 4.0)
    fake = ("import json, pathlib, sys; a = sys.argv; o = a[a.index('--out') + 1]; k = a[a.index('--key') + 1]\n"
            "if k.startswith('aspirin'): sys.exit('boom')\n"
            "p = pathlib.Path(o, k); p.mkdir(parents=True)\n"
            "(p / 'results.json').write_text(json.dumps({'test_energy_mae_meV': 2.0, "
            "'test_force_mae_meV_per_A': 6.0}))")

    def fake_command(run, suite_dir, **kw):
        return [sys.executable, "-c", fake, "--out", str(suite_dir), "--key", run.key]

    monkeypatch.setattr(rp, "train_command", fake_command)
    lines = []
    codes = rp.launch(suite, tmp_path, log=lines.append)
    assert codes == {"aspirin_l2": 1, "benzene_l2": 0, "ethanol_l2": 0}
    assert any("skipped" in ln for ln in lines)
    assert "boom" in (tmp_path / suite.name / "aspirin_l2.log").read_text()
    rows = rp.collect(suite, tmp_path, codes)
    assert [r.status for r in rows] == ["failed", "done", "done"]
    assert rows[1].energy_meV == 2.0


def test_cli_collect_only_and_dry_run(tmp_path, capsys):
    tool = _tool()
    write_results(tmp_path / "md17_ablation" / "aspirin_linear_dot", 5.8, 9.2)
    assert tool.main(["md17", "--ablation", "--collect-only", "--out", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| linear message + dot-product attention | 5.80 / 9.20 | 5.8 / 9.2 | 1.00× / 1.00× | done |" in out
    assert "| non-linear message + MLP attention | — / — |" in out and "missing" in out
    assert (tmp_path / "md17_ablation" / "table.md").is_file()

    assert tool.main(["md17", "--dry-run", "--molecules", "ethanol", "--out", str(tmp_path),
                      "--set", "train.batch_size=4", "--set", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "--config md17_ethanol" in out and "--set train.batch_size=4 --set optim.lr=1e-3" in out
    assert not (tmp_path / "md17_l2").exists()

    assert tool.main(["md22", "--ablation", "--dry-run"]) == 2
    assert "error:" in capsys.readouterr().err


def test_suites_match_the_shipped_configs_and_catalog():
    """Every run names a config in configs/, the right data set, and the catalog's atom count."""
    from scalable_equiformer.config import load_config
    from scalable_equiformer.data.catalog import get_info

    for suite in (rp.md17_suite(lmax=2), rp.md17_suite(lmax=3), rp.md17_suite(ablation=True), rp.md22_suite()):
        for run in suite.runs:
            cfg = load_config(run.config, run.overrides)
            info = get_info(cfg.data.name)
            assert info.num_atoms == run.num_atoms, (run.config, cfg.data.name)
            if suite.kind == "md22":
                assert cfg.data.name == rp.MD22_SYSTEMS[run.key][1]
            else:
                assert cfg.model.lmax == (3 if suite.name == "md17_l3" else 2), run.config
        if suite.name == "md17_ablation":
            variants = {(load_config(r.config, r.overrides).model.message,
                         load_config(r.config, r.overrides).model.attention) for r in suite.runs}
            assert variants == {("nonlinear", "mlp"), ("linear", "mlp"), ("linear", "dot")}


def test_launch_resumes_an_interrupted_run_and_moves_a_rerun_aside(tmp_path):
    """train.py refuses a run folder that exists, so reproduce decides first: an interrupted run
    (last.pt, no results.json) is continued with --resume; under --rerun a finished run, and a folder
    without a checkpoint, are moved aside (nothing deleted) and trained afresh."""
    suite = rp.md17_suite(["aspirin"], lmax=2)
    run = suite.runs[0]
    suite_dir = tmp_path / suite.name
    rd = suite_dir / run.key
    rd.mkdir(parents=True)
    (rd / "last.pt").write_bytes(b"x")
    logs = []
    assert rp._prepare_run_folder(rd, rerun=False, log=logs.append) is True
    assert rd.is_dir() and "resumed" in logs[-1]
    assert rp.train_command(run, suite_dir, resume=True)[-2:] == ["--resume", str(rd)]
    (rd / "results.json").write_text("{}")
    assert rp._prepare_run_folder(rd, rerun=True, log=logs.append) is False
    assert not rd.exists() and "moved to" in logs[-1]
    (aside,) = suite_dir.glob(f"{run.key}.old-*")
    assert (aside / "results.json").read_text() == "{}" and (aside / "last.pt").read_bytes() == b"x"
    rd.mkdir()  # a folder without a checkpoint (a run that died before its first epoch)
    assert rp._prepare_run_folder(rd, rerun=False, log=logs.append) is False and not rd.exists()
    assert rp._prepare_run_folder(rd, rerun=False, log=logs.append) is False  # nothing there: nothing to do
