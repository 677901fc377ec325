"""Shared pieces of the training tests (no tests here): a tiny model, the shipped data file,
and launchers for the entry points."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import tiny_sets

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEMO_DATA = REPO / "scalable_equiformer" / "demo_data" / "aspirin_xtb_500K.npz"

#: the tiny model cut to lmax 1 and one block: many runs on 2 shared CPU cores (~0.1 s per step of 4 aspirins)
TINY = tiny_sets(lmax=1, num_blocks=1, irreps_node="8x0e+4x1e", irreps_head="4x0e+2x1e",
                 irreps_feedforward="16x0e+4x1e", radial_hidden="[8]", cutoff=4.0)


def tiny_overrides(tmp_path, *extra, epochs=2, train=16, val=8, test=8, batch=4, dtype="float64", run_name="run"):
    return TINY + [
        f"data.path={DEMO_DATA}",
        f"data.train_size={train}", f"data.val_size={val}", f"data.test_size={test}",
        f"train.max_epochs={epochs}", f"train.batch_size={batch}", "train.eval_batch_size=8",
        f"train.out_dir={tmp_path}", f"train.run_name={run_name}", "train.progress=false", "train.log_every=2",
        f"model.dtype={dtype}", "optim.lr=0.005", "optim.warmup_epochs=0.5", "optim.min_lr=0.0005",
        "logging.tensorboard=true", "logging.plot=true",
    ] + list(extra)


def train_in_process(cfg, **kw):
    """``scalable_equiformer.training.run`` in this process, on one torch thread (restored after)."""
    import torch

    from scalable_equiformer.training import run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(cfg, **kw)
    finally:
        torch.set_num_threads(n)


def tiny_config(tmp_path, *extra, **kw):
    from scalable_equiformer.config import load_config

    return load_config(None, tiny_overrides(tmp_path, *extra, **kw))


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = str(threads)
    e["DS_ACCELERATOR"] = "cpu"
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None)
    return e


def launch(args, cwd, timeout=240, threads=1) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env(threads), capture_output=True, text=True, timeout=timeout)


def train_cmd(*args) -> list[str]:
    return [PY, str(REPO / "train.py"), *args]


def sets(overrides) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def read_metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def epoch_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["val_force_mae_meV_per_A"] != ""]


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def empty_config(folder) -> str:
    """A config file with no keys (defaults), so launched runs equal in-process ``tiny_config`` runs."""
    p = Path(folder) / "defaults.yaml"
    p.write_text("# defaults only; the tests pass everything with --set\n")
    return str(p)
