"""A run folder belongs to one process and one data set; no NaN is ever the last good checkpoint
(issue 24, items 1 and 2).

* rank 0 holds an flock on ``<run>/.lock`` for the whole run: a second start, or ``--resume`` of a
  run that still trains, refuses in one line naming the holder (never "delete" the live folder);
  kill -9 leaves nothing stale;
* the data are fingerprinted into every checkpoint: ``--resume`` on changed data is refused;
* ``train.run_name`` is a folder name; a new run refuses a folder that exists; nothing is written
  through a symbolic link planted in the folder;
* checkpoints follow the umask; a read-only folder is one line; stale temporary files are removed;
* non-finite weights or validation stop the run before last.pt / best.pt are replaced; evaluate.py,
  the calculator and ``load_model`` refuse a checkpoint with non-finite weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest
import torch

from helpers.equivariance import single_thread  # noqa: F401 (fixture)
from test_train_common import (
    DEMO_DATA, PY, REPO, empty_config, env, launch, sets, tiny_config, tiny_overrides, train_cmd,
)
from test_train_common import train_in_process as _run

from scalable_equiformer.errors import CheckpointError, ConfigError, DataError, TrainingError
from scalable_equiformer.training import checkpoint as ckpt_io
from scalable_equiformer.training.run_folder import RunFolder

EVALUATE = str(REPO / "tools" / "evaluate.py")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 2-epoch run stopped after epoch 1 (last.pt = best.pt = epoch 1)."""
    root = tmp_path_factory.mktemp("stopped")
    _run(tiny_config(root, epochs=2), stop_after_epochs=1)
    return root / "run"


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst, symlinks=True)
    return dst


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def _one_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# ---- run_name ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/b", "..", "."])
def test_run_name_must_be_a_folder_name(tmp_path, name):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path / "out", run_name=name)
    msg = str(e.value)
    assert "train.run_name: must be a folder name" in msg and repr(name) in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_a_new_run_refuses_a_folder_that_exists_and_is_not_its_own(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError) as e:
        _run(tiny_config(tmp_path))
    assert str(e.value) == (f"{run}: the folder exists and is not this run's (a new run makes its own folder); "
                            "choose another train.run_name")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ---- one process per folder ----------------------------------------------------------------------

def test_a_live_run_that_has_no_checkpoint_yet_is_named_not_deleted(tmp_path):
    """The process holding the lock stands for a run still before its first last.pt."""
    from scalable_equiformer.training.run_folder import lock_run_folder, unlock_run_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(tiny_config(tmp_path).dump())
    fd = lock_run_folder(run, resume=False)
    try:
        before = _snapshot(run)
        with pytest.raises(ConfigError) as e:
            _run(tiny_config(tmp_path))
        msg = str(e.value)
        assert msg.startswith(f"{run}: the run folder is in use by a running training process "
                              f"(pid {os.getpid()} on host ")
        assert "delete" not in msg and "\n" not in msg
        with pytest.raises(ConfigError) as e:
            _run(tiny_config(tmp_path), resume=str(run))
        assert f"in use by a running training process (pid {os.getpid()}" in str(e.value)
        assert "delete" not in str(e.value) and "then --resume it" in str(e.value)
        assert _snapshot(run) == before
    finally:
        unlock_run_folder(fd)
    # released: the same start now says what the folder is (and only now that deleting it is safe)
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        _run(tiny_config(tmp_path))


@pytest.mark.slow
def test_second_start_and_resume_of_a_training_run_refuse_and_kill_9_leaves_no_lock(tmp_path):
    over = tiny_overrides(tmp_path, epochs=500, train=8, val=4, test=4)
    cmd = train_cmd("--config", empty_config(tmp_path), *sets(over))
    live = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    try:
        deadline = time.time() + 240
        while not (run / "last.pt").is_file():
            assert live.poll() is None and time.time() < deadline, live.stderr.read()[-3000:] if live.poll() else "slow"
            time.sleep(0.5)
        for args in (cmd, train_cmd("--resume", str(run))):
            line = _one_line(launch(args, cwd=tmp_path, timeout=180))
            assert f"{run}: the run folder is in use by a running training process (pid {live.pid} on host " in line
            assert "delete" not in line
        assert live.poll() is None  # the live run went on
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    # the kernel dropped the lock with the process: the run resumes
    epoch = ckpt_io.load_checkpoint(run / "last.pt")["epoch"]
    res = _run(tiny_config(tmp_path, epochs=epoch + 1, train=8, val=4, test=4), resume=str(run))
    assert res["epochs"] == epoch + 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# ---- one data set per folder ---------------------------------------------------------------------

def _write_npz(path, **changes):
    with np.load(DEMO_DATA) as d:
        arrays = {k: d[k] for k in d.files if k != "md5"}
    arrays.update(changes)
    np.savez(path, **arrays)
    return arrays


def test_resume_on_other_data_at_the_same_path_is_refused_naming_what_differs(tmp_path):
    data = tmp_path / "data.npz"
    arrays = _write_npz(data)
    cfg = tiny_config(tmp_path, f"data.path={data}", epochs=2)
    _run(cfg, stop_after_epochs=1)
    run = tmp_path / "run"
    fp = ckpt_io.load_checkpoint(run / "last.pt")["data"]
    assert fp["path"] == str(data) and fp["frames"] == 1500 and fp["atoms"] == 21 and len(fp["sha256"]) == 64
    before = _snapshot(run)

    # other frames of the same molecule, same count
    perm = np.random.default_rng(0).permutation(1500)
    _write_npz(data, R=arrays["R"][perm], E=arrays["E"][perm], F=arrays["F"][perm])
    with pytest.raises(DataError) as e:
        _run(cfg, resume=str(run))
    msg = str(e.value)
    assert msg.startswith(f"{data}: not the data the run in {run} trained on (sha256 {fp['sha256'][:16]}... then, ")
    assert "frames" not in msg and "\n" not in msg and "--resume only on the same data" in msg
    # fewer frames
    _write_npz(data, R=arrays["R"][:1000], E=arrays["E"][:1000], F=arrays["F"][:1000])
    with pytest.raises(DataError, match=r"not the data the run in .* trained on \(1500 frames then, 1000 now; sha256"):
        _run(cfg, resume=str(run))
    assert _snapshot(run) == before  # nothing written

    _write_npz(data)  # the data it trained on: resumes
    assert _run(cfg, resume=str(run))["epochs"] == 2


# ---- files of the folder -------------------------------------------------------------------------

def test_nothing_is_written_through_a_symlink_planted_in_the_run_folder(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours\n")
    (run / "train.log").unlink()
    (run / "train.log").symlink_to(victim)
    with pytest.raises(ConfigError) as e:
        _run(tiny_config(tmp_path, epochs=2), resume=str(run))
    assert str(e.value).startswith(f"{run / 'train.log'}: is a symbolic link (to {victim}); refused")
    assert victim.read_text() == "not yours\n"

    # a link planted while a run writes: appends refuse it, atomic writes replace the link itself
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to(victim)
    with pytest.raises(ConfigError, match="metrics.csv: is a symbolic link"):
        RunFolder(run).append_metrics({"epoch": 3, "step": 9})
    (run / "results.json").symlink_to(victim)
    ckpt_io.write_json(run / "results.json", {"x": 1})
    assert victim.read_text() == "not yours\n" and not (run / "results.json").is_symlink()


def test_checkpoints_and_splits_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        _run(tiny_config(tmp_path, epochs=1))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file()}
    assert modes["config.yaml"] == 0o664
    for name in ("last.pt", "best.pt", "splits.npz", "versions.json", "results.json", "metrics.csv"):
        assert modes[name] == 0o664, (name, oct(modes[name]))


def test_stale_temporary_files_are_removed_when_the_run_resumes(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    stale = [run / ".last.pt.k3j_x9q2.tmp", run / ".metrics.csv.abcdefgh.tmp", run / ".splits.a1b2c3d4.npz.part"]
    for p in stale:
        p.write_bytes(b"")
    (run / "notes.tmp").write_text("mine\n")  # not one of ours
    _run(tiny_config(tmp_path, epochs=2), resume=str(run))
    assert not any(p.exists() for p in stale)
    assert (run / "notes.tmp").read_text() == "mine\n"


def _unprivileged(cmd):
    """``cmd`` as a user whom file modes apply to (root ignores them)."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot be tried")
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *cmd]


def test_resume_of_a_read_only_folder_is_one_line(stopped):
    base = tempfile.mkdtemp(prefix="se-ro-")  # readable by the unprivileged user
    try:
        os.chmod(base, 0o755)
        run = shutil.copytree(stopped, os.path.join(base, "run"))
        home = os.path.join(base, "home")
        os.mkdir(home)
        os.chmod(home, 0o777)
        for root, dirs, files in os.walk(run):
            for f in files:
                os.chmod(os.path.join(root, f), 0o444)
            os.chmod(root, 0o555)
        e = {**env(), "HOME": home, "MPLCONFIGDIR": home}
        proc = subprocess.run(_unprivileged(train_cmd("--resume", run)), cwd=home, env=e, capture_output=True,
                              text=True, timeout=240)
        line = _one_line(proc)
        assert line.startswith(f"error: {run}: the run folder is not writable (Permission denied); --resume writes")
    finally:
        for root, dirs, files in os.walk(base):
            os.chmod(root, 0o755)
        shutil.rmtree(base)


# ---- no NaN kept as good -------------------------------------------------------------------------

def test_weights_that_turn_non_finite_in_an_epochs_last_step_stop_before_last_pt(tmp_path, monkeypatch):
    from scalable_equiformer.training import steps

    real = steps.optimizer_step
    calls = {"n": 0}

    def step(engine, *a, **kw):
        loss = real(engine, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 8:  # epoch 2 (4 steps per epoch), its last step: a finite loss, then NaN weights
            with torch.no_grad():
                next(engine.base.parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(steps, "optimizer_step", step)
    with pytest.raises(TrainingError) as e:
        _run(tiny_config(tmp_path, epochs=3))
    run = tmp_path / "run"
    msg = str(e.value)
    assert msg.startswith("non-finite weights (") and "after epoch 2 (step 8)" in msg and "\n" not in msg
    assert f"the last good checkpoint is kept: {run / 'last.pt'} (epoch 1)" in msg
    for name in ("last.pt", "best.pt"):
        ck = ckpt_io.load_checkpoint(run / name)  # loads: finite
        assert ck["epoch"] == 1


def test_a_non_finite_validation_stops_before_last_pt_and_best_pt(tmp_path, monkeypatch):
    from scalable_equiformer.training import trainer

    real = trainer.evaluate
    calls = {"n": 0}

    def evaluate(*a, **kw):
        m = real(*a, **kw)
        calls["n"] += 1
        return {**m, "force_mae_meV_per_A": float("nan")} if calls["n"] == 2 else m

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    with pytest.raises(TrainingError) as e:
        _run(tiny_config(tmp_path, epochs=3))
    run = tmp_path / "run"
    msg = str(e.value)
    assert msg.startswith("non-finite validation metrics after epoch 2 (force_mae_meV_per_A nan)")
    assert f"the last good checkpoint is kept: {run / 'last.pt'} (epoch 1)" in msg
    assert ckpt_io.load_checkpoint(run / "last.pt")["epoch"] == 1
    assert ckpt_io.load_checkpoint(run / "best.pt")["epoch"] == 1


def test_a_checkpoint_with_non_finite_weights_is_refused_on_load(stopped, tmp_path):
    from scalable_equiformer.calculator import EquiformerCalculator
    from scalable_equiformer.inference import load_model

    run = _copy(stopped, tmp_path)
    ck = torch.load(run / "best.pt", weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = torch.full_like(ck["model"][name], float("nan"))
    ckpt_io.save_checkpoint(run / "best.pt", {k: v for k, v in ck.items() if k not in ("format", "kind")})
    expect = (f"{run / 'best.pt'}: weights hold NaN or infinite values (model tensor {name}): refused (a run that "
              "diverged?); last.pt next to it is intact (epoch 1)")
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert str(e.value) == expect
    with pytest.raises(CheckpointError) as e:
        EquiformerCalculator(str(run / "best.pt"))
    assert str(e.value) == expect
    proc = launch([PY, EVALUATE, str(run / "best.pt"), "--data", str(DEMO_DATA), "--json", str(tmp_path / "m.json")],
                  cwd=tmp_path)
    assert _one_line(proc) == f"error: {expect}" and not (tmp_path / "m.json").exists()
    # a last.pt with NaN weights (from an older version) is not resumed from
    shutil.copy(run / "best.pt", run / "last.pt")
    with pytest.raises(CheckpointError, match="last.pt: weights hold NaN or infinite values"):
        _run(tiny_config(tmp_path, epochs=2), resume=str(run))
