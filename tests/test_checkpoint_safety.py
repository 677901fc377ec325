"""Checkpoints that could give silently wrong numbers or lose the best model (issue 12).

* flipped bytes are detected on every load (zip CRC-32), naming the file and the state of the
  other checkpoint of the run folder;
* a run stopped between writing last.pt and best.pt gets its best.pt back on --resume;
* a full disk while saving: one line naming the file, the previous checkpoint intact, how to go on;
* a run folder that stopped before its first checkpoint: no loop between "resume it" and
  "checkpoint not found";
* a file that holds objects other than tensors is refused as such.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import zipfile

import pytest
import torch

from helpers.equivariance import single_thread  # noqa: F401 (fixture)
from test_train_common import DEMO_DATA, PY, REPO, launch, results, tiny_config, train_cmd
from test_train_common import train_in_process as _run

from scalable_equiformer.errors import CheckpointError, ConfigError, TrainingError
from scalable_equiformer.inference import load_model
from scalable_equiformer.training import checkpoint as ckpt_io

EVALUATE = str(REPO / "tools" / "evaluate.py")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run (last.pt, best.pt)."""
    root = tmp_path_factory.mktemp("safety")
    _run(tiny_config(root, test=8))
    return root / "run"


def _copy_run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def flip_middle(path, count=4):
    """Flip ``count`` bytes in the middle of the largest member's data (a weight tensor): the
    damage that ``torch.load`` does not notice."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    mid = start + info.file_size // 2
    for k in range(count):
        data[mid + k] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


# ---- 1. flipped bytes ---------------------------------------------------------------------------

def test_flipped_bytes_are_detected_on_every_load(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    member = flip_middle(run / "last.pt")
    torch.load(run / "last.pt", weights_only=True)  # torch alone notices nothing: the case to catch
    with pytest.raises(CheckpointError) as e:
        ckpt_io.load_checkpoint(run / "last.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(run / "last.pt"))
    assert "corrupt checkpoint" in msg and member in msg
    assert "best.pt next to it is intact (epoch 2)" in msg

    # --resume stops at once with the same line (exit 2, no traceback)
    proc = launch(train_cmd("--resume", str(run)), cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "last.pt: corrupt checkpoint" in lines[0] and "best.pt next to it is intact" in lines[0]


def test_evaluate_refuses_a_damaged_best_pt_and_names_the_intact_last_pt(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    flip_middle(run / "best.pt")
    torch.load(run / "best.pt", weights_only=True)  # silently loads without the CRC check
    proc = launch([PY, EVALUATE, str(run / "best.pt"), "--data", str(DEMO_DATA)], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {run / 'best.pt'}: corrupt checkpoint")
    assert "last.pt next to it is intact (epoch 2)" in lines[0]
    assert "MAE" not in proc.stdout  # no metrics printed

    flip_middle(run / "last.pt")  # both damaged
    with pytest.raises(CheckpointError, match="best.pt: corrupt checkpoint .*; last.pt next to it is damaged too"):
        load_model(run)


def test_checkpoints_are_written_with_crc32_even_when_torch_is_told_not_to(tmp_path):
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        ckpt_io.save_checkpoint(tmp_path / "x.pt", {"config": {}, "model": {"w": torch.arange(1000.0)}})
    finally:
        config.save.compute_crc32 = before
    assert ckpt_io.zip_problem(tmp_path / "x.pt") is None
    assert config.save.compute_crc32 == before  # restored
    ck = ckpt_io.load_checkpoint(tmp_path / "x.pt")
    assert torch.equal(ck["model"]["w"], torch.arange(1000.0)) and ck["elements"] is None


# ---- 2. stopped between last.pt and best.pt ----------------------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so no handler catches it)."""


def test_stopped_between_last_and_best_gets_best_back_on_resume(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2)
    real_save = ckpt_io.save_checkpoint
    seen = []

    def save(path, payload):
        seen.append((path.name, payload.get("epoch")))
        if path.name == "best.pt" and payload.get("epoch") == 2:
            raise Killed
        return real_save(path, payload)

    monkeypatch.setattr(ckpt_io, "save_checkpoint", save)
    with pytest.raises(Killed):
        _run(cfg)
    monkeypatch.setattr(ckpt_io, "save_checkpoint", real_save)
    run = tmp_path / "run"
    # the precondition: epoch 2 was the best so far (its best.pt write was the one interrupted)
    assert ("best.pt", 2) in seen
    last = ckpt_io.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["trainer"]["best_epoch"] == 2
    assert ckpt_io.load_checkpoint(run / "best.pt")["epoch"] == 1  # what the kill left

    _run(cfg, resume=str(run))
    best = ckpt_io.load_checkpoint(run / "best.pt")
    assert best["epoch"] == 2
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v), k
    assert best["metrics"] == last["metrics"] and best["elements"] == last["elements"]
    res = results(run)
    assert res["best_epoch"] == 2
    assert res["best_val_force_mae_meV_per_A"] == pytest.approx(last["metrics"]["force_mae_meV_per_A"])
    # the test metrics are those of the weights in best.pt (epoch 2), as evaluate.py finds them
    out = tmp_path / "m.json"
    proc = launch([PY, EVALUATE, str(run / "best.pt"), "--data", str(DEMO_DATA), "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    m = json.loads(out.read_text())
    assert m["epoch"] == 2 and m["force_mae_meV_per_A"] == pytest.approx(res["test_force_mae_meV_per_A"], rel=1e-12)

    # a damaged best.pt of the epoch last.pt holds is restored the same way
    flip_middle(run / "best.pt")
    _run(cfg, resume=str(run))
    again = ckpt_io.load_checkpoint(run / "best.pt")
    assert again["epoch"] == 2 and all(torch.equal(again["model"][k], v) for k, v in last["model"].items())
    assert results(run)["test_force_mae_meV_per_A"] == res["test_force_mae_meV_per_A"]


# ---- 3. disk full while saving -----------------------------------------------------------------

def _disk_full_on(monkeypatch, name: str, nth: int):
    """Writes to the ``nth`` temporary file of ``name`` fail with ENOSPC after 1 KiB (what a full
    disk does), as seen through the file object that atomic_write_bytes opens."""
    real_fdopen = os.fdopen
    count = {"n": 0}

    class Full:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def flush(self):
            self.fh.flush()

        def fileno(self):
            return self.fh.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fdopen(fd, *args, **kw):
        fh = real_fdopen(fd, *args, **kw)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(target).startswith(f".{name}."):
            count["n"] += 1
            if count["n"] == nth:
                return Full(fh)
        return fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_while_saving_names_the_file_keeps_the_previous_and_says_how_to_resume(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2)
    _disk_full_on(monkeypatch, "last.pt", nth=2)  # epoch 2's last.pt
    with pytest.raises(TrainingError) as e:
        _run(cfg)
    monkeypatch.undo()
    run = tmp_path / "run"
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{run / 'last.pt'}: cannot write the checkpoint ({os.strerror(errno.ENOSPC)})")
    assert "the previous last.pt is intact" in msg and f"python train.py --resume {run}" in msg
    assert not list(run.glob(".*.tmp"))  # the half-written temporary file is gone
    assert ckpt_io.load_checkpoint(run / "last.pt")["epoch"] == 1  # the previous one, intact
    _run(cfg, resume=str(run))  # and the advice works
    assert results(run)["epochs"] == 2


def test_disk_full_on_the_first_checkpoint_and_a_run_folder_without_one(tmp_path, monkeypatch):
    """No loop: 'resume it' must not lead to 'checkpoint not found'."""
    cfg = tiny_config(tmp_path, epochs=1)
    _disk_full_on(monkeypatch, "last.pt", nth=1)
    with pytest.raises(TrainingError) as e:
        _run(cfg)
    monkeypatch.undo()
    run = tmp_path / "run"
    msg = str(e.value)
    assert "no earlier last.pt exists" in msg and "before its first checkpoint" in msg and "--resume" not in msg
    assert not (run / "last.pt").exists() and (run / "config.yaml").is_file()

    with pytest.raises(ConfigError) as e:  # the same command again
        _run(cfg)
    assert "stopped before its first checkpoint" in str(e.value) and "--resume" not in str(e.value)
    with pytest.raises(CheckpointError) as e:  # --resume anyway
        _run(cfg, resume=str(run))
    assert "stopped before its first checkpoint" in str(e.value) and "not found" not in str(e.value)
    proc = launch(train_cmd("--resume", str(run)), cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "nothing to resume" in lines[0], proc.stderr[-2000:]


def test_write_error_of_any_file_is_one_line(tmp_path, monkeypatch):
    _disk_full_on(monkeypatch, "results.json", nth=1)
    with pytest.raises(ckpt_io.WriteError) as e:
        ckpt_io.write_json(tmp_path / "results.json", {"x": "y" * 5000})
    assert str(e.value) == (f"{tmp_path / 'results.json'}: cannot write ({os.strerror(errno.ENOSPC)}); "
                            "no earlier results.json exists")
    assert list(tmp_path.iterdir()) == []


# ---- 4. objects other than tensors --------------------------------------------------------------

class NotATensor:
    pass


def test_a_checkpoint_with_pickled_objects_is_refused_as_such(trained, tmp_path):
    ck = torch.load(trained / "best.pt", weights_only=True)
    ck["extra"] = NotATensor()
    bad = tmp_path / "best.pt"
    torch.save(ck, bad)
    with pytest.raises(CheckpointError) as e:
        ckpt_io.load_checkpoint(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: holds objects other than tensors: refused") and "NotATensor" in msg
    assert "\n" not in msg and "corrupt" not in msg
    proc = launch([PY, EVALUATE, str(bad), "--data", str(DEMO_DATA)], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "holds objects other than tensors: refused" in lines[0]


def test_a_stop_during_a_checkpoint_write_lands_after_it(tmp_path):
    """SIGTERM (under the trainer's sigterm_as_interrupt) or Ctrl-C while torch.save writes: the
    checkpoint is written whole and in place, then the stop is raised (before, it landed inside
    torch's zip writer: "unexpected pos", a traceback, exit code 1)."""
    import os
    import signal

    from scalable_equiformer import checkpoint_io, runtime

    def write(fh, sig):
        fh.write(b"head ")  # some bytes out, then the signal, then the rest
        os.kill(os.getpid(), sig)
        fh.write(b"and tail")

    for sig, stop in ((signal.SIGTERM, runtime.Terminated), (signal.SIGINT, KeyboardInterrupt)):
        path = tmp_path / f"{sig.name}.pt"
        with runtime.sigterm_as_interrupt(), pytest.raises(stop):
            checkpoint_io.atomic_write_bytes(path, lambda fh: write(fh, sig))
        assert path.read_bytes() == b"head and tail" and not list(tmp_path.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
