"""Training end to end on one process: the run folder, resume equality, micro-batching, bad input.

Tiny model (see test_train_common.TINY) on 16 frames of the shipped aspirin file, fp64 on CPU,
one torch thread (two threads on a busy 2-core machine are many times slower).
"""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch

from helpers.equivariance import single_thread  # noqa: F401 (fixture)
from test_train_common import (
    epoch_rows, launch, read_metrics, results, sets, tiny_config, tiny_overrides, train_cmd, REPO,
)
from test_train_common import train_in_process as _run

from scalable_equiformer.errors import CheckpointError, ConfigError, DataError, TrainingError


pytestmark = pytest.mark.usefixtures("single_thread")


# ---- launch mode 1: python train.py (one process, no launcher) ------------------------------

@pytest.mark.slow
def test_python_launch_writes_the_run_folder(tmp_path):
    over = tiny_overrides(tmp_path, "train.ema_decay=0.9", dtype="float32")
    proc = launch(train_cmd("--config", "demo", *sets(over)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "meV per molecule" in out and "meV/Å per force component" in out  # units in the log header
    assert "val force MAE" in out
    run = tmp_path / "run"
    for name in ("config.yaml", "versions.json", "splits.npz", "metrics.csv", "last.pt", "best.pt",
                 "results.json", "learning_curve.png", "train.log"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    res = results(run)
    for key in ("test_energy_mae_meV", "test_force_mae_meV_per_A", "test_energy_mae_kcal_per_mol",
                "test_force_mae_kcal_per_mol_per_A", "n_test_frames", "checkpoint"):
        assert key in res
    assert res["n_test_frames"] == 8
    assert res["device"] == "cpu" and res["peak_memory_bytes"] is None  # CUDA runs: max_memory_allocated
    assert math.isclose(res["test_energy_mae_kcal_per_mol"], res["test_energy_mae_meV"] / 1000 * 23.060547830619026)
    versions = json.loads((run / "versions.json").read_text())
    for key in ("python", "torch", "e3nn", "deepspeed", "torch_geometric", "git"):
        assert key in versions
    rows = read_metrics(run)
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A",
                             "time", "kind"]
    assert [int(r["epoch"]) for r in epoch_rows(run)] == [1, 2]
    # checkpoints hold only plain types and load with weights_only=True
    for name in ("last.pt", "best.pt"):
        ck = torch.load(run / name, weights_only=True)
        assert ck["config"]["model"]["irreps_node"] == "8x0e+4x1e"
        assert set(ck["stats"]) >= {"force_rms", "energy_per_atom_mean"}
    # the resolved config reloads to the same values
    from scalable_equiformer.config import load_config

    again = load_config(run / "config.yaml")
    assert again.to_dict() == load_config("demo", over).to_dict()


# ---- resume ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_continues_the_same_run(tmp_path):
    """Interrupted after 1 of 3 epochs and resumed == uninterrupted (fp64, EMA on)."""
    extra = ("train.ema_decay=0.8", "train.log_every=1")
    full = tiny_config(tmp_path, *extra, epochs=3, run_name="full")
    _run(full)
    part = tiny_config(tmp_path, *extra, epochs=3, run_name="part")
    assert _run(part, stop_after_epochs=1) is None
    assert not (tmp_path / "part" / "results.json").exists()
    assert len(epoch_rows(tmp_path / "part")) == 1
    _run(part, resume=str(tmp_path / "part"))

    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in ("epoch", "step", "lr", "train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A"):
            if ra[k] == "":
                assert rb[k] == ""
            else:
                assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-9, abs=1e-12), (k, ra, rb)
    ra, rb = results(tmp_path / "full"), results(tmp_path / "part")
    assert rb["test_force_mae_meV_per_A"] == pytest.approx(ra["test_force_mae_meV_per_A"], rel=1e-9)
    assert rb["test_energy_mae_meV"] == pytest.approx(ra["test_energy_mae_meV"], rel=1e-9)


# ---- metrics.csv -------------------------------------------------------------------------------

def test_metrics_rows_say_their_kind_and_the_curve_has_one_point_per_step(tmp_path):
    """An epoch's last step was written twice with the same step number (the interval mean and the
    epoch mean), indistinguishable, and learning_curve.png drew a vertical spike per epoch: rows now
    carry kind step/epoch, the line is the step rows (one point per step), the epoch means are markers."""
    from scalable_equiformer.training.run_folder import learning_curve_series

    run = tmp_path / "run"
    _run(tiny_config(tmp_path, "train.eval_every=2", epochs=3))  # 4 steps per epoch, log_every 2
    rows = read_metrics(run)
    assert [(r["kind"], int(r["epoch"]), int(r["step"])) for r in rows] == [
        ("step", 1, 2), ("step", 1, 4), ("epoch", 1, 4), ("step", 2, 6), ("step", 2, 8), ("epoch", 2, 8),
        ("step", 3, 10), ("step", 3, 12), ("epoch", 3, 12)]
    # epoch 1 not evaluated
    assert [r["val_force_mae_meV_per_A"] != "" for r in rows if r["kind"] == "epoch"] == [False, True, True]
    series = learning_curve_series(rows)
    assert series["steps"][0] == [2, 4, 6, 8, 10, 12]  # strictly increasing: no vertical segment
    assert series["epoch_loss"][0] == [4, 8, 12] and [int(r["epoch"]) for r in series["epochs"]] == [1, 2, 3]
    assert (run / "learning_curve.png").is_file()
    from scalable_equiformer.training.run_folder import CSV_COLUMNS

    readme = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith("| `metrics.csv`"))
    assert all(f"`{c}`" in readme for c in CSV_COLUMNS) and "a `step` row" in readme and "an `epoch` row" in readme


def test_metrics_written_before_the_kind_column_resume_and_plot(tmp_path):
    """A run folder whose metrics.csv has no kind column (written before it existed) resumes: the file
    is rewritten with the column, the old rows get their kind (each epoch's last row is its epoch row)."""
    import csv

    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, epochs=2)
    assert _run(cfg, stop_after_epochs=1) is None
    old = [{k: v for k, v in r.items() if k != "kind"} for r in read_metrics(run)]
    with open(run / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(old[0]))
        w.writeheader()
        w.writerows(old)
    _run(cfg, resume=str(run))
    rows = read_metrics(run)
    assert [(r["kind"], int(r["epoch"]), int(r["step"])) for r in rows] == [
        ("step", 1, 2), ("step", 1, 4), ("epoch", 1, 4), ("step", 2, 6), ("step", 2, 8), ("epoch", 2, 8)]


# ---- micro-batching ----------------------------------------------------------------------------

def _first_step_grads(tmp_path, name, *extra):
    from scalable_equiformer.training import engine

    captured = {}
    original = engine.PlainEngine.step

    class Stop(Exception):
        pass

    def step(self, lr):
        if self.world > 1:
            raise AssertionError("single process expected")
        captured.update({n: p.grad.detach().clone() for n, p in self.module.named_parameters() if p.grad is not None})
        raise Stop

    engine.PlainEngine.step = step
    try:
        with pytest.raises(Stop):
            _run(tiny_config(tmp_path, *extra, batch=8, run_name=name))
    finally:
        engine.PlainEngine.step = original
    return captured


@pytest.mark.parametrize("loss", ["l2mae", "mse"])
def test_micro_batches_with_accumulation_equal_one_full_batch(tmp_path, loss):
    full = _first_step_grads(tmp_path, f"full_{loss}", f"train.loss={loss}")
    for micro in (4, 1):
        acc = _first_step_grads(tmp_path, f"micro{micro}_{loss}", f"train.loss={loss}",
                                f"memory.micro_batch_size={micro}")
        assert full.keys() == acc.keys() and len(full) > 5
        for n in full:
            torch.testing.assert_close(acc[n], full[n], rtol=1e-10, atol=1e-13, msg=lambda m: f"{n}: {m}")


# ---- bad input: each a one-line error ----------------------------------------------------------

def test_unknown_config_key_is_one_line_error(tmp_path):
    proc = launch(train_cmd("--config", "demo", "--set", "train.max_epoch=3"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "train.max_epoch" in err[0] and "max_epochs" in err[0]


@pytest.mark.parametrize("rank_vars,args,lines", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, ("--config", "demo", "--set", "train.max_epoch=3"), 1),
    ({"RANK": "1", "WORLD_SIZE": "2"}, ("--config", "demo", "--set", "train.max_epoch=3"), 0),
    ({"RANK": "1", "WORLD_SIZE": "2"}, ("--resume", "no_such_run"), 1),  # may differ per rank: printed
])
def test_config_error_is_printed_by_rank_0_only(tmp_path, rank_vars, args, lines):
    """Under torchrun / deepspeed every rank gets the same ConfigError: rank 0 prints it, all exit 2.
    Other errors (I/O, checkpoints) can differ per rank and are printed by every rank."""
    import subprocess

    from test_train_common import env

    proc = subprocess.run(train_cmd(*args), cwd=tmp_path, env={**env(), **rank_vars}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == lines and all(x.startswith("error: ") for x in err), proc.stderr[-2000:]


def test_config_error_found_on_some_ranks_only_is_printed_everywhere(monkeypatch):
    """The trainer marks errors that only some ranks hit (``rank_specific``); train.py prints those on every rank."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    monkeypatch.setenv("RANK", "1")
    same, own = ConfigError("x"), ConfigError("y")
    own.rank_specific = True
    assert not entry._report(same) and entry._report(own) and entry._report(DataError("z"))
    monkeypatch.setenv("RANK", "0")
    assert entry._report(same)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "1")  # what the deepspeed launcher's --local_rank sets
    assert not entry._report(same)


def test_missing_dataset_file_names_url_and_download_command(tmp_path):
    cfg = tiny_config(tmp_path, "data.path=null", "data.name=md17_aspirin", f"data.root={tmp_path / 'nodata'}")
    with pytest.raises(DataError) as e:
        _run(cfg)
    msg = str(e.value)
    assert "md17_aspirin" in msg and "http" in msg and "tools/download.py" in msg and "\n" not in msg
    cfg = tiny_config(tmp_path, f"data.path={tmp_path / 'missing.npz'}")
    with pytest.raises(DataError, match="missing.npz"):
        _run(cfg)


def test_batch_larger_than_training_set(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size \(8\) is larger than the training split \(4 frames"):
        _run(tiny_config(tmp_path, train=4, batch=8))


def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from scalable_equiformer.training import steps

    calls = {"n": 0}
    original = steps.loss_parts

    def poisoned(out, batch, cfg, *a, **kw):
        calls["n"] += 1
        terms = original(out, batch, cfg, *a, **kw)
        if calls["n"] == 6:  # epoch 2 (4 steps per epoch), batch 2
            return terms._replace(loss=terms.loss * float("nan"))
        return terms

    monkeypatch.setattr(steps, "loss_parts", poisoned)
    cfg = tiny_config(tmp_path, epochs=3)
    with pytest.raises(TrainingError) as e:
        _run(cfg)
    msg = str(e.value)
    assert "epoch 2, batch 2 of 4" in msg and "last.pt" in msg and "\n" not in msg
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_resume_with_another_model_config_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2)
    _run(cfg, stop_after_epochs=1)
    other = tiny_config(tmp_path, "model.num_blocks=2", epochs=2)
    with pytest.raises(CheckpointError, match=r"different model config \(model.num_blocks: checkpoint 1 vs config 2"):
        _run(other, resume=str(tmp_path / "run"))


def test_run_folder_that_holds_a_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data: {}\n")
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        _run(tiny_config(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_one_line_error(tmp_path, damage):
    cfg = tiny_config(tmp_path, epochs=2)
    _run(cfg, stop_after_epochs=1)
    last = tmp_path / "run" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(b"not a checkpoint at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as e:
        _run(cfg, resume=str(tmp_path / "run"))
    assert "\n" not in str(e.value)
    proc = launch(train_cmd("--resume", str(tmp_path / "run")), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "last.pt" in lines[0], proc.stderr[-2000:]


# ---- SIGTERM (what schedulers send first) -----------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_with_one_line_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM once ended the run without a word: now one line (stdout and train.log) names the signal,
    the last checkpoint and the --resume command, exit status 143; the resumed run equals one never stopped."""
    import signal
    import subprocess
    import time

    from test_train_common import empty_config, env

    from scalable_equiformer.training import checkpoint as ckpt_io

    epochs = 6
    full = tiny_config(tmp_path, epochs=epochs, run_name="full")
    _run(full)
    run = tmp_path / "part"
    cmd = train_cmd("--config", empty_config(tmp_path), *sets(tiny_overrides(tmp_path, epochs=epochs, run_name="part")))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    ck = ckpt_io.load_checkpoint(run / "last.pt")
    assert ck["epoch"] < epochs
    line = re.escape(f"stopped by SIGTERM after step STEP; last checkpoint: {run / 'last.pt'} (epoch {ck['epoch']}, "
                     f"step {ck['step']}); continue from it with: python train.py --resume {run}")
    said = [x for x in out.splitlines() if "stopped by SIGTERM" in x]
    assert len(said) == 1 and re.fullmatch(r"\S+ " + line.replace("STEP", r"\d+"), said[0]), out[-2000:]
    assert sum("stopped by SIGTERM" in x for x in (run / "train.log").read_text().splitlines()) == 1

    proc = launch(train_cmd("--resume", str(run)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a, b = read_metrics(tmp_path / "full"), read_metrics(run)
    assert [(r["epoch"], r["step"]) for r in a] == [(r["epoch"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ("lr", "train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A"):
            assert (ra[k] == "") == (rb[k] == "") \
                and (ra[k] == "" or float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-9)), k
    full_mae = results(tmp_path / "full")["test_force_mae_meV_per_A"]
    assert results(run)["test_force_mae_meV_per_A"] == pytest.approx(full_mae, rel=1e-9)


def test_sigterm_before_the_run_folder_exists_says_so(tmp_path):
    """Stopped during set-up (here: while reading the data), before there is anything to resume; in a
    process of its own (SIGTERM's default action would end this one)."""
    code = ("import os, runpy, signal, sys\n"
            "from scalable_equiformer.training import trainer\n"
            "trainer.Trainer._load_data = lambda self: os.kill(os.getpid(), signal.SIGTERM)\n"
            f"sys.argv = {['train.py', '--config', 'demo', '--set', *tiny_overrides(tmp_path)]!r}\n"
            f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n")
    proc = launch([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip() == "stopped by SIGTERM before the run folder was made: nothing to resume, start it again"
    assert not (tmp_path / "run").exists()


def test_the_log_header_says_how_best_is_chosen(tmp_path):
    """The epoch lines mark *best by validation force MAE; the header now says so (and the README)."""
    from scalable_equiformer.training.progress import BEST_RULE

    _run(tiny_config(tmp_path, "logging.plot=false", "logging.tensorboard=false", epochs=1))
    log_lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    header = [x for x in log_lines if "best.pt: " in x]
    assert len(header) == 1 and header[0].endswith("best.pt: the evaluated epoch with the lowest validation force MAE "
                                                   "(meV/Å per component), marked *best in the epoch lines")
    assert header[0].endswith(BEST_RULE)
    assert log_lines.index(header[0]) < next(i for i, x in enumerate(log_lines) if x.endswith("]") and "*best" in x)
    readme = (REPO / "README.md").read_text()
    assert ("`best.pt` holds the evaluated epoch with the lowest validation force MAE (meV/Å), the epoch lines "
            "marked `*best`") in readme
