"""A trained checkpoint for the MD-engine tests: the tiny model (smooth cutoff, float64) trained
through ``train.py`` for two epochs on the shipped AT-AT GFN2-xTB frames (H, C, N, O: the elements
of DNA bases and of peptides, so the OpenMM ML/MM tests can put a peptide on it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import tiny_sets

ROOT = Path(__file__).resolve().parents[2]
ATAT = ROOT / "scalable_equiformer" / "demo_data" / "AT-AT_xtb_500K_20frames.npz"


def train_atat_checkpoint(out: Path, dtype: str = "float64") -> Path:
    """``best.pt`` of a tiny ``dtype`` model trained 2 epochs on the shipped AT-AT frames (~30 s)."""
    sets = tiny_sets() + [
        f"model.dtype={dtype}", "model.smooth_cutoff=true", f"data.path={ATAT}", "data.train_size=12",
        "data.val_size=4", "data.test_size=4", "train.max_epochs=2", "train.batch_size=4", "train.eval_batch_size=4",
        "optim.lr=2e-3", "optim.warmup_epochs=0", f"train.out_dir={out}", "train.run_name=atat",
        "train.progress=false", "logging.tensorboard=false", "logging.plot=false",
    ]
    base = Path(out) / "defaults.yaml"
    base.write_text("# dataclass defaults; everything else comes from --set\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(base)] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("train.py failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
    return Path(out) / "atat" / "best.pt"
