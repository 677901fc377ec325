"""Molecules to profile: frames of a data file, or synthetic molecules of N atoms at a real density.

A synthetic molecule of N atoms is built from copies of one AT-AT frame (frame 0 of the GFN2-xTB
AT-AT run shipped in ``scalable_equiformer/demo_data/``, 60 atoms, two stacked Watson-Crick pairs).
Copies get a seeded random orientation and are packed one by one as close to the cluster centre as
a 2.5 Å minimum contact allows, which gives a
globular molecule with the neighbour density of real ones: 27.7 edges per atom at 120 atoms and a
5 Å cutoff (the original Equiformer measurement used a 120-atom system with 3,306 edges, 27.6 per
atom). The last copy is cut to N atoms. Building N atoms and taking the first M < N gives the same
atoms as building M, so sweeps share one build.

>>> z, pos = synthetic_molecule(70)
>>> z.shape, pos.shape
((70,), (70, 3))
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data.statistics import count_edges  # the one neighbour counter; callers use systems.count_edges  # noqa: F401
from ..errors import DataError

#: Data shipped inside the package (GFN2-xTB MD made for this project; see demo_data/README.md).
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"
#: 20 frames of the AT-AT run (60 atoms, C20H22N14O4); frame 0 is tiled by :func:`synthetic_molecule`.
ATAT_FILE = DEMO_DATA / "AT-AT_xtb_500K_20frames.npz"
ASPIRIN_FILE = DEMO_DATA / "aspirin_xtb_500K.npz"

CONTACT = 2.5  # Å: minimum distance between atoms of different copies


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


def _tile_frame(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: AT-AT frame for synthetic molecules not found (pass --data FILE instead)")
    with np.load(path) as d:
        z = np.asarray(d["z"], dtype=np.int64)
        pos = np.asarray(d["R"][0], dtype=np.float64)
    return z, pos - pos.mean(0)


@lru_cache(maxsize=4)
def _packed(n_copies: int, seed: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    z0, c = _tile_frame(Path(path))
    rng = np.random.default_rng(seed)
    dirs = _fibonacci_sphere(48)  # [D, 3]
    xs, zs = [c], [z0]
    for _ in range(n_copies - 1):
        x = np.concatenate(xs)  # [M, 3]
        centre = x.mean(0)
        best_r, best_y = np.inf, None
        for _rot in range(4):
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            y0 = c @ q.T  # [60, 3]
            lo = np.zeros(len(dirs))
            hi = np.full(len(dirs), 40.0)
            x2 = (x ** 2).sum(-1)  # [M]
            for _it in range(16):  # bisection on the distance from the centre, all directions at once
                mid = (lo + hi) / 2
                y = (y0[None] + centre + mid[:, None, None] * dirs[:, None, :]).reshape(-1, 3)  # [D*60, 3]
                d2 = (y ** 2).sum(-1)[:, None] + x2[None] - 2.0 * (y @ x.T)  # [D*60, M]
                d2 = d2.reshape(len(dirs), -1).min(axis=1)  # [D]
                ok = d2 >= CONTACT ** 2
                hi = np.where(ok, mid, hi)
                lo = np.where(ok, lo, mid)
            k = int(np.argmin(hi))
            if hi[k] < best_r:
                best_r, best_y = hi[k], y0 + centre + hi[k] * dirs[k]
        xs.append(best_y)
        zs.append(z0)
    return np.concatenate(zs), np.concatenate(xs)


def synthetic_molecule(n_atoms: int, seed: int = 0,
                       frame_file: Path | str = ATAT_FILE) -> tuple[np.ndarray, np.ndarray]:
    """``z`` [N] int64 and positions [N, 3] Å of a globular molecule packed from AT-AT copies."""
    if n_atoms < 1:
        raise DataError(f"--atoms {n_atoms}: must be >= 1")
    per = 60
    n_copies = -(-n_atoms // per)
    # build in steps of 4 copies so that sweeps reuse one cached build (prefixes are identical)
    z, pos = _packed(-(-n_copies // 4) * 4, seed, str(frame_file))
    return z[:n_atoms].copy(), pos[:n_atoms].copy()


def load_frames(path: Path | str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``z`` [N] and the first ``count`` frames' positions [count, N, 3] Å of a data file (cycled)."""
    from ..data.sgdml import read_file

    raw = read_file(path)
    idx = np.arange(count) % len(raw.positions)
    return np.asarray(raw.z, np.int64), np.asarray(raw.positions[idx], np.float64)


