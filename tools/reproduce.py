#!/usr/bin/env python
"""Reproduce the Equiformer tables: train the configs one after another, then write a markdown table
and a bar plot against the published numbers.

    python tools/reproduce.py md17                                   # 8 molecules, Lmax 2
    python tools/reproduce.py md17 --molecules aspirin ethanol --lmax 3
    python tools/reproduce.py md17 --ablation                        # aspirin, 3 attention variants
    python tools/reproduce.py md22 --systems atat dha --data-root data
    python tools/reproduce.py md17 --collect-only                    # table from existing run folders
    python tools/reproduce.py md17 --quick                           # a CPU minute: tiny model, shipped aspirin data
    python tools/reproduce.py md17 --dry-run                         # print the commands

Runs land in ``<out>/<suite>/<run>/`` (suite = md17_l2, md17_l3, md17_ablation, md22); the table is
``<out>/<suite>/table.md``, the plot ``bars.png``, the rows ``summary.json``. Runs whose
``results.json`` exists are not trained again (``--rerun`` to force). Units: MD17 in meV and meV/Å;
MD22 in meV/atom and kcal/mol.

The command line (:func:`main`) sits at the end; the functions above it are what tests call.

Units. MD17 rows are in the Equiformer paper's units: energy MAE per molecule in meV, force MAE in
meV/Å. MD22 rows are printed both ways MD22 papers use: energy MAE per atom (meV/atom) with forces
in meV/Å, and total energy MAE in kcal/mol with forces in kcal/mol/Å (1 eV = 23.060547830619026
kcal/mol; per-atom = total / number of atoms).

A run folder is ``<out>/<suite>/<key>/`` (``train.out_dir=<out>/<suite>``, ``train.run_name=<key>``).
Its state is read from the files training writes:

* ``results.json`` present -> ``done`` (test metrics);
* only ``metrics.csv`` -> ``running`` (the last validation metrics, marked as such);
* neither -> ``missing`` (or ``failed`` when this tool launched it and it exited non-zero).

Nothing here imports the trainer: runs are subprocesses, so a crash in one run leaves a row, not a
traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scalable_equiformer.data import KCAL_PER_EV  # noqa: E402
from scalable_equiformer.errors import UserError  # noqa: E402
from scalable_equiformer.presets import tiny_model_dict  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# Published numbers
# ---------------------------------------------------------------------------------------------------

#: MD17 molecules in the paper's order: key -> label. The key names the config ``md17_<key>``.
MD17_MOLECULES = {
    "aspirin": "Aspirin",
    "benzene": "Benzene",
    "ethanol": "Ethanol",
    "malonaldehyde": "Malonaldehyde",
    "naphthalene": "Naphthalene",
    "salicylic": "Salicylic acid",
    "toluene": "Toluene",
    "uracil": "Uracil",
}

MD17_ATOMS = {"aspirin": 21, "benzene": 12, "ethanol": 9, "malonaldehyde": 9, "naphthalene": 18,
              "salicylic": 16, "toluene": 15, "uracil": 12}

#: Equiformer (Liao & Smidt, ICLR 2023), MD17 test MAE: (energy meV, force meV/Å), by Lmax.
PAPER_MD17 = {
    2: {"aspirin": (5.3, 7.2), "benzene": (2.2, 6.6), "ethanol": (2.2, 3.1), "malonaldehyde": (3.3, 5.8),
        "naphthalene": (3.7, 2.1), "salicylic": (4.5, 4.1), "toluene": (3.8, 2.1), "uracil": (4.3, 3.3)},
    3: {"aspirin": (5.3, 6.6), "benzene": (2.5, 8.1), "ethanol": (2.2, 2.9), "malonaldehyde": (3.2, 5.4),
        "naphthalene": (4.4, 2.0), "salicylic": (4.3, 3.9), "toluene": (3.7, 2.1), "uracil": (4.3, 3.4)},
}

#: Aspirin ablation (Lmax 2): key -> (label, config overrides, (E meV, F meV/Å) of the seed study's
#: reproduction of the Equiformer paper's ablation).
ABLATION = {
    "nonlinear_mlp": ("non-linear message + MLP attention",
                      ["model.message=nonlinear", "model.attention=mlp"], (5.4, 7.2)),
    "linear_mlp": ("linear message + MLP attention",
                   ["model.message=linear", "model.attention=mlp"], (5.4, 8.2)),
    "linear_dot": ("linear message + dot-product attention",
                   ["model.message=linear", "model.attention=dot"], (5.8, 9.2)),
}

#: MD22 systems: config key (configs/md22_<key>.yaml) -> (label, catalog name, atoms).
MD22_SYSTEMS = {
    "ac_ala3_nhme": ("Ac-Ala3-NHMe", "md22_Ac-Ala3-NHMe", 42),
    "dha": ("DHA", "md22_DHA", 56),
    "stachyose": ("Stachyose", "md22_stachyose", 87),
    "atat": ("AT-AT", "md22_AT-AT", 60),
    "atat_cgcg": ("AT-AT-CG-CG", "md22_AT-AT-CG-CG", 118),
    "buckyball_catcher": ("Buckyball catcher", "md22_buckyball-catcher", 148),
    "nanotube": ("Double-walled nanotube", "md22_double-walled_nanotube", 370),
}

#: Published Equiformer numbers on MD22: none confirmed. The Equiformer paper reports no MD22 results,
#: and no Equiformer (V1) MD22 table could be read and checked from these machines, so the paper
#: columns stay empty rather than carry unverified numbers. Fill in as key -> (E meV/atom, F meV/Å)
#: with the source in MD22_PAPER_SOURCE once a number is checked against its publication.
PAPER_MD22: dict[str, tuple[float, float]] = {}
MD22_PAPER_SOURCE = ""
MD22_PAPER_NOTE = ("No published Equiformer (V1) MD22 numbers could be confirmed; the paper columns are "
                   "left empty on purpose.")

# ---------------------------------------------------------------------------------------------------
# Quick mode: the whole pipeline in a few minutes on 2 CPU cores
# ---------------------------------------------------------------------------------------------------

#: Quick mode's molecule, and the data its runs read: the GFN2-xTB aspirin MD frames shipped inside
#: the package (made for this project, not MD17's DFT reference data), so that quick mode needs no
#: download. Other molecules keep their catalog names and need their files under the data root.
QUICK_MOLECULE = "aspirin"
QUICK_DATA = REPO_ROOT / "scalable_equiformer" / "demo_data" / "aspirin_xtb_500K.npz"

#: Tiny model (configs/tiny.yaml at twice its channels; the suite's lmax stays), few frames, two
#: epochs. Results are not comparable with the paper; the point is that the same commands, run
#: folders and table work end to end.
QUICK_OVERRIDES = [f"model.{k}={v}" for k, v in tiny_model_dict(width=2).items() if k != "lmax"] + [
    "data.train_size=100",
    "data.val_size=20",
    "data.test_size=100",
    "train.max_epochs=2",
    "train.batch_size=8",
    "train.eval_batch_size=25",
    "optim.lr=0.002",
    "optim.warmup_epochs=0",
    "train.progress=false",
    "logging.tensorboard=false",
    "logging.plot=false",
]


# ---------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One training run of a reproduction suite.

    Attributes:
        key: run folder name (``train.run_name``), unique in its suite.
        label: row label in the table.
        config: config name or path passed to ``train.py --config``.
        overrides: ``a.b=value`` strings passed with ``--set`` (after the config file).
        paper: published (energy, force) MAE in the table's units, or None.
        num_atoms: atoms per molecule (MD22 per-atom energies; informative for MD17).
    """

    key: str
    label: str
    config: str
    overrides: list[str] = field(default_factory=list)
    paper: Optional[tuple[float, float]] = None
    num_atoms: Optional[int] = None


@dataclass
class Suite:
    """A set of runs that form one table. ``kind`` is ``md17`` (meV, meV/Å per molecule) or
    ``md22`` (meV/atom and kcal/mol)."""

    name: str
    kind: str
    title: str
    runs: list[RunSpec]
    paper_label: str = "paper"
    note: str = ""


def _check_names(requested: Optional[Sequence[str]], known: Iterable[str], what: str) -> list[str]:
    known = list(known)
    if not requested:
        return known
    out = []
    lower = {k.lower(): k for k in known}
    for name in requested:
        key = lower.get(name.lower().replace("-", "_"))
        if key is None:
            # labels too: "AT-AT" -> atat, "salicylic_acid" -> salicylic
            squashed = name.lower().replace("-", "").replace("_", "").replace(" ", "")
            key = next((k for k in known if k.replace("_", "") == squashed
                        or squashed.startswith(k.replace("_", ""))), None)
        if key is None:
            raise UserError(f"unknown {what} {name!r}; known: {', '.join(known)}")
        out.append(key)
    return out


def md17_suite(molecules: Optional[Sequence[str]] = None, lmax: int = 2, ablation: bool = False) -> Suite:
    """The MD17 table at ``lmax`` (2 or 3), or the aspirin ablation when ``ablation``."""
    if lmax not in PAPER_MD17:
        raise UserError(f"--lmax must be 2 or 3, not {lmax}")
    if ablation:
        if lmax != 2:
            raise UserError("--ablation is the Lmax 2 aspirin study; drop --lmax 3")
        runs = [RunSpec(key=f"aspirin_{k}", label=label, config="md17_aspirin", overrides=list(sets),
                        paper=paper, num_atoms=MD17_ATOMS["aspirin"])
                for k, (label, sets, paper) in ABLATION.items()]
        return Suite(name="md17_ablation", kind="md17", title="MD17 aspirin ablation (Lmax 2)", runs=runs,
                     paper_label="seed study",
                     note="Reference column: the seed study's reproduction of the Equiformer ablation.")
    suffix = "" if lmax == 2 else f"_l{lmax}"
    runs = [RunSpec(key=f"{m}{suffix or '_l2'}", label=MD17_MOLECULES[m], config=f"md17_{m}{suffix}",
                    paper=PAPER_MD17[lmax][m], num_atoms=MD17_ATOMS[m])
            for m in _check_names(molecules, MD17_MOLECULES, "MD17 molecule")]
    return Suite(name=f"md17_l{lmax}", kind="md17", title=f"MD17, Equiformer Lmax {lmax}", runs=runs,
                 paper_label="paper", note="Paper: Liao & Smidt, Equiformer, ICLR 2023, MD17 table.")


def md22_suite(systems: Optional[Sequence[str]] = None) -> Suite:
    """The seven MD22 systems."""
    runs = []
    for key in _check_names(systems, MD22_SYSTEMS, "MD22 system"):
        label, _catalog, atoms = MD22_SYSTEMS[key]
        runs.append(RunSpec(key=key, label=label, config=f"md22_{key}", paper=PAPER_MD22.get(key),
                            num_atoms=atoms))
    note = MD22_PAPER_NOTE if not PAPER_MD22 else f"Paper: {MD22_PAPER_SOURCE}"
    return Suite(name="md22", kind="md22", title="MD22, Equiformer Lmax 2", runs=runs, note=note)


def apply_options(suite: Suite, *, epochs: Optional[int] = None, data_root: Optional[str] = None,
                  quick: bool = False, quick_data: Optional[Path] = None,
                  extra: Sequence[str] = ()) -> Suite:
    """Add the command-line overrides to every run, in the order the tool applies them:
    quick settings, data root, epochs, then the user's ``--set`` (last wins).

    In quick mode the runs of :data:`QUICK_MOLECULE` (aspirin, ablation variants included) read
    ``quick_data`` (default :data:`QUICK_DATA`, the shipped xTB frames) through ``data.path``; other
    molecules keep their catalog name and need their file under the data root.
    """
    for run in suite.runs:
        sets: list[str] = []
        if quick:
            sets += QUICK_OVERRIDES
            if run.key.startswith(QUICK_MOLECULE):
                path = Path(quick_data) if quick_data is not None else QUICK_DATA
                sets.append(f"data.path={path}")
        if data_root is not None:
            sets.append(f"data.root={data_root}")
        if epochs is not None:
            sets.append(f"train.max_epochs={epochs}")
        run.overrides = list(run.overrides) + sets + list(extra)
    if quick:
        suite.title += " (quick mode)"
        suite.note = ("Quick mode: tiny model, 100 training frames, 2 epochs; aspirin trains on the shipped "
                      "GFN2-xTB frames, not MD17's DFT data: the numbers test the pipeline and are not comparable "
                      "with the reference. " + suite.note)
    return suite


# ---------------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------------


def train_command(run: RunSpec, suite_dir: Path, launcher: str = "python", nproc: Optional[int] = None,
                  python: Optional[str] = None, resume: bool = False) -> list[str]:
    """The command that trains ``run`` into ``suite_dir/run.key`` (``resume``: continues the run there)."""
    script = str(REPO_ROOT / "train.py")
    if launcher == "python":
        cmd = [python or sys.executable, script]
    elif launcher == "deepspeed":
        cmd = ["deepspeed"] + (["--num_gpus", str(nproc)] if nproc else []) + [script]
    else:
        raise UserError(f"--launcher must be python or deepspeed, not {launcher!r}")
    if resume:
        return cmd + ["--resume", str(suite_dir / run.key)]
    sets = list(run.overrides) + [f"train.out_dir={suite_dir}", f"train.run_name={run.key}"]
    return cmd + ["--config", run.config] + [x for s in sets for x in ("--set", s)]


def _prepare_run_folder(run_dir: Path, rerun: bool, log=print) -> bool:
    """What to do with ``run_dir`` before training into it (a run folder belongs to one run: train.py
    refuses a folder that exists). An interrupted run (``last.pt``, no ``results.json``) is resumed
    (returns True); a finished one under ``--rerun``, or a folder without a checkpoint, is moved aside to
    ``<key>.old-<time>`` (nothing is deleted) and the run starts afresh (False)."""
    if not run_dir.exists():
        return False
    if not rerun and (run_dir / "last.pt").is_file() and not (run_dir / "results.json").is_file():
        log(f"    {run_dir.name}: interrupted run (last.pt), resumed")
        return True
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(aside)
    log(f"    {run_dir.name}: earlier folder moved to {aside}")
    return False


def launch(suite: Suite, out: Path, *, launcher: str = "python", nproc: Optional[int] = None,
           dry_run: bool = False, skip_done: bool = True, log=print) -> dict[str, int]:
    """Train the suite's runs one after another. Returns key -> exit code (0 = fine; runs that were
    skipped because their ``results.json`` exists count as 0). stdout/stderr of each run go to
    ``<out>/<suite>/<key>.log``. A failing run does not stop the others."""
    suite_dir = Path(out).resolve() / suite.name
    codes: dict[str, int] = {}
    for i, run in enumerate(suite.runs, 1):
        cmd = train_command(run, suite_dir, launcher=launcher, nproc=nproc)
        if dry_run:
            log(" ".join(shlex.quote(c) for c in cmd))
            continue
        if skip_done and (suite_dir / run.key / "results.json").is_file():
            log(f"[{i}/{len(suite.runs)}] {run.key}: results.json exists, skipped")
            codes[run.key] = 0
            continue
        if _prepare_run_folder(suite_dir / run.key, rerun=not skip_done, log=log):
            cmd = train_command(run, suite_dir, launcher=launcher, nproc=nproc, resume=True)
        line = " ".join(shlex.quote(c) for c in cmd)
        suite_dir.mkdir(parents=True, exist_ok=True)
        log_path = suite_dir / f"{run.key}.log"
        log(f"[{i}/{len(suite.runs)}] {run.key}: {line}\n    log: {log_path}")
        t0 = time.time()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        codes[run.key] = proc.returncode
        status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see {log_path})"
        log(f"    {status} in {time.time() - t0:.0f} s")
    return codes


# ---------------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row: a run's state and its errors in eV-based units (meV per molecule, meV/Å)."""

    key: str
    label: str
    status: str  # done | running | failed | missing
    energy_meV: Optional[float] = None  # MAE per molecule
    force_meV_per_A: Optional[float] = None
    paper: Optional[tuple[float, float]] = None
    num_atoms: Optional[int] = None
    epoch: Optional[float] = None  # last epoch seen (running rows)
    n_test_frames: Optional[int] = None
    note: str = ""


def _float(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _last_val_metrics(path: Path) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(val energy meV, val force meV/Å, epoch) of the last metrics.csv row that has them."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return None, None, None
    for row in reversed(rows):
        e = _float(row.get("val_energy_mae_meV"))
        f = _float(row.get("val_force_mae_meV_per_A"))
        if e is not None or f is not None:
            return e, f, _float(row.get("epoch"))
    return None, None, (_float(rows[-1].get("epoch")) if rows else None)


def _error_line(log: Path, width: int = 120) -> str:
    """The ``error: ...`` line a failed run printed (entry points print user errors that way)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("error:"):
            ln = ln[len("error:"):].strip().replace("|", "/")
            return ln if len(ln) <= width else ln[: width - 1] + "…"
    return ""


def collect_run(run: RunSpec, suite_dir: Path, exit_code: Optional[int] = None) -> Row:
    """The state of one run folder (see the module docstring)."""
    folder = Path(suite_dir) / run.key
    row = Row(key=run.key, label=run.label, status="missing", paper=run.paper, num_atoms=run.num_atoms)
    results = folder / "results.json"
    metrics = folder / "metrics.csv"
    if results.is_file():
        try:
            data = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            row.status, row.note = "failed", f"unreadable results.json ({exc})"
            return row
        row.status = "done"
        row.energy_meV = _float(data.get("test_energy_mae_meV"))
        row.force_meV_per_A = _float(data.get("test_force_mae_meV_per_A"))
        if row.energy_meV is None and _float(data.get("test_energy_mae_kcal_per_mol")) is not None:
            row.energy_meV = data["test_energy_mae_kcal_per_mol"] / KCAL_PER_EV * 1000.0
        if row.force_meV_per_A is None and _float(data.get("test_force_mae_kcal_per_mol_per_A")) is not None:
            row.force_meV_per_A = data["test_force_mae_kcal_per_mol_per_A"] / KCAL_PER_EV * 1000.0
        n = data.get("n_test_frames")
        row.n_test_frames = int(n) if isinstance(n, (int, float)) else None
        return row
    if exit_code not in (None, 0):
        row.status, row.note = "failed", f"exit {exit_code}; see {run.key}.log"
        reason = _error_line(Path(suite_dir) / f"{run.key}.log")
        if reason:
            row.note += f": {reason}"
    if metrics.is_file():
        e, f, epoch = _last_val_metrics(metrics)
        row.energy_meV, row.force_meV_per_A, row.epoch = e, f, epoch
        if row.status == "missing":
            row.status = "running"
        ep = f" epoch {epoch:g}" if epoch is not None else ""
        row.note = (row.note + "; " if row.note else "") + f"last validation{ep}"
    return row


def collect(suite: Suite, out: Path, exit_codes: Optional[dict[str, int]] = None) -> list[Row]:
    """One row per run of the suite, whatever state its folder is in."""
    suite_dir = Path(out) / suite.name
    exit_codes = exit_codes or {}
    return [collect_run(run, suite_dir, exit_codes.get(run.key)) for run in suite.runs]


# ---------------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------------


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pair(a: Optional[float], b: Optional[float], digits: int = 2) -> str:
    return f"{_fmt(a, digits)} / {_fmt(b, digits)}"


def _ratio(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    if ours is None or paper is None or paper == 0:
        return None
    return ours / paper


def _ratio_pair(a: Optional[float], b: Optional[float]) -> str:
    return " / ".join("—" if r is None else f"{r:.2f}×" for r in (a, b))


def _status(row: Row) -> str:
    return row.status + (f" ({row.note})" if row.note else "")


def md22_units(row: Row) -> dict:
    """A row's errors in the MD22 units: meV/atom, meV/Å, kcal/mol (total), kcal/mol/Å."""
    e, f, n = row.energy_meV, row.force_meV_per_A, row.num_atoms
    return {
        "energy_meV_per_atom": e / n if (e is not None and n) else None,
        "force_meV_per_A": f,
        "energy_kcal_per_mol": e / 1000.0 * KCAL_PER_EV if e is not None else None,
        "force_kcal_per_mol_per_A": f / 1000.0 * KCAL_PER_EV if f is not None else None,
    }


def markdown_table(suite: Suite, rows: Sequence[Row]) -> str:
    """The table as markdown, with units in the header and a legend below."""
    lines = [f"### {suite.title}", ""]
    ref = suite.paper_label
    if suite.kind == "md17":
        lines += [f"| molecule | ours E / F | {ref} E / F | ratio E / F | status |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            pe, pf = r.paper if r.paper else (None, None)
            lines.append(f"| {r.label} | {_pair(r.energy_meV, r.force_meV_per_A)} | {_pair(pe, pf, 1)} | "
                         f"{_ratio_pair(_ratio(r.energy_meV, pe), _ratio(r.force_meV_per_A, pf))} | {_status(r)} |")
        lines += ["", "E: energy MAE per molecule in meV; F: force MAE in meV/Å (test set; `running` rows show "
                  "the last validation metrics). Ratio = ours / " + ref + " (below 1 is better)."]
    else:
        lines += [f"| system | atoms | ours E (meV/atom) / F (meV/Å) | ours E (kcal/mol) / F (kcal/mol/Å) | "
                  f"{ref} E (meV/atom) / F (meV/Å) | ratio E / F | status |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            u = md22_units(r)
            pe, pf = r.paper if r.paper else (None, None)
            lines.append(
                f"| {r.label} | {r.num_atoms or '—'} | {_pair(u['energy_meV_per_atom'], u['force_meV_per_A'], 3)} | "
                f"{_pair(u['energy_kcal_per_mol'], u['force_kcal_per_mol_per_A'], 3)} | {_pair(pe, pf, 3)} | "
                f"{_ratio_pair(_ratio(u['energy_meV_per_atom'], pe), _ratio(r.force_meV_per_A, pf))} | {_status(r)} |")
        lines += ["", "Energy MAE per atom = total energy MAE / atoms; 1 eV = 23.060547830619026 kcal/mol. "
                  "Test set; `running` rows show the last validation metrics."]
    if suite.note:
        lines += ["", suite.note]
    done = sum(r.status == "done" for r in rows)
    lines += ["", f"{done} of {len(rows)} runs finished."]
    return "\n".join(lines) + "\n"


def bar_plot(suite: Suite, rows: Sequence[Row], path: Path) -> Path:
    """Grouped bars, ours against the reference, energy and force side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r.label + ("*" if r.status == "running" else "") for r in rows]
    if suite.kind == "md17":
        ours_e = [r.energy_meV for r in rows]
        e_unit = "energy MAE (meV)"
    else:
        ours_e = [md22_units(r)["energy_meV_per_atom"] for r in rows]
        e_unit = "energy MAE (meV/atom)"
    ours_f = [r.force_meV_per_A for r in rows]
    paper_e = [r.paper[0] if r.paper else None for r in rows]
    paper_f = [r.paper[1] if r.paper else None for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.3 * len(rows) + 3), 4.2))
    nan = float("nan")
    for ax, ours, ref, unit in ((axes[0], ours_e, paper_e, e_unit), (axes[1], ours_f, paper_f, "force MAE (meV/Å)")):
        bars = ax.bar(x - width / 2, [nan if v is None else v for v in ours], width, label="ours", color="tab:blue")
        for patch, r in zip(bars.patches, rows):
            if r.status == "running":
                patch.set_hatch("//")
                patch.set_alpha(0.6)
        ax.bar(x + width / 2, [nan if v is None else v for v in ref], width, label=suite.paper_label, color="tab:gray")
        values = [v for v in list(ours) + list(ref) if v is not None and v > 0]
        if values and max(values) / min(values) > 30:  # quick runs sit orders of magnitude above the paper
            ax.set_yscale("log")
        pad = 0.6 if len(rows) > 2 else 1.2  # keep one or two bars from filling the panel
        ax.set_xlim(-pad, len(rows) - 1 + pad)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_ylabel(unit)
        ax.legend(frameon=False)
    running = any(r.status == "running" for r in rows)
    fig.suptitle(suite.title + ("   (* hatched: running, last validation)" if running else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(suite: Suite, rows: Sequence[Row], out: Path, plot: bool = True) -> dict[str, Path]:
    """``table.md``, ``bars.png`` and ``summary.json`` in ``<out>/<suite>/``."""
    suite_dir = Path(out) / suite.name
    suite_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": suite_dir / "table.md", "summary": suite_dir / "summary.json"}
    paths["table"].write_text(markdown_table(suite, rows))
    summary = {
        "suite": suite.name, "title": suite.title, "kind": suite.kind, "reference": suite.paper_label,
        "note": suite.note,
        "units": {"energy_meV": "meV per molecule", "force_meV_per_A": "meV/Å"},
        "rows": [dict(asdict(r), **(md22_units(r) if suite.kind == "md22" else {})) for r in rows],
    }
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    if plot:
        paths["plot"] = bar_plot(suite, rows, suite_dir / "bars.png")
    return paths


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

#: the usage part of the module docstring (its first paragraphs), the --help epilog
_EPILOG = __doc__.split("\n\n", 1)[1].split("\n\nThe command line", 1)[0]


def parse_args(argv=None) -> argparse.Namespace:
    from scalable_equiformer.cli import ArgumentParser, add_set_argument, positive_int

    p = ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    p.add_argument("suite", choices=["md17", "md22"], help="which table")
    p.add_argument("--molecules", "--systems", nargs="+", metavar="NAME", dest="molecules",
                   help="subset of molecules (md17) or systems (md22: atat atat_cgcg ac_ala3_nhme dha "
                        "stachyose buckyball_catcher nanotube); default all")
    p.add_argument("--lmax", type=int, default=2, choices=[2, 3], help="md17: configs md17_<mol>[_l3] (default 2)")
    p.add_argument("--ablation", action="store_true",
                   help="md17: aspirin with non-linear+MLP, linear+MLP and linear+dot-product attention")
    p.add_argument("--epochs", type=positive_int, help="train.max_epochs for every run")
    p.add_argument("--data-root", help="data.root for every run (where the catalog .npz files are)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    add_set_argument(p, dest="sets",
                     help="config overrides for every run (repeatable; win over the tool's own settings)")
    p.add_argument("--launcher", choices=["python", "deepspeed"], default="python",
                   help="python train.py (default) or the deepspeed launcher")
    p.add_argument("--nproc", type=positive_int, help="deepspeed launcher: --num_gpus")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 2 epochs, 100 frames; aspirin reads the GFN2-xTB aspirin frames shipped in "
                        "the package (not MD17 data; default molecule: aspirin)")
    p.add_argument("--quick-data", type=Path,
                   help=f"--quick: the data file for aspirin (default: the shipped {QUICK_DATA.name})")
    p.add_argument("--collect-only", action="store_true", help="no training: table from existing run folders")
    p.add_argument("--rerun", action="store_true", help="train runs again even when results.json exists")
    p.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    p.add_argument("--no-plot", action="store_true", help="skip bars.png")
    args = p.parse_args(argv)
    return args


def build_suite(args: argparse.Namespace) -> Suite:
    if args.suite == "md17":
        molecules = args.molecules or ([QUICK_MOLECULE] if args.quick and not args.ablation else None)
        suite = md17_suite(molecules, lmax=args.lmax, ablation=args.ablation)
    else:
        if args.ablation or args.lmax != 2:
            raise UserError("--ablation and --lmax apply to md17 only")
        suite = md22_suite(args.molecules)
    return apply_options(suite, epochs=args.epochs, data_root=args.data_root, quick=args.quick,
                            quick_data=args.quick_data, extra=args.sets)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        suite = build_suite(args)
        out = Path(args.out)
        codes = {}
        if args.dry_run:
            launch(suite, out, launcher=args.launcher, nproc=args.nproc, dry_run=True)
            return 0
        if not args.collect_only:
            codes = launch(suite, out, launcher=args.launcher, nproc=args.nproc, skip_done=not args.rerun)
        rows = collect(suite, out, codes)
        paths = write_report(suite, rows, out, plot=not args.no_plot)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(paths["table"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    failed = [r.key for r in rows if r.status == "failed"]
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
