"""Seeded train/val/test splits of a file's frames, saved in the run folder so a resumed run uses
the same frames; and the published rMD17 index splits.

A split is a dict ``{"train": idx, "val": idx, "test": idx}`` of int64 numpy arrays of frame
indices into the file (0-based), each sorted ascending, pairwise disjoint.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from ..checkpoint_io import atomic_write_bytes
from ..errors import DataError

SPLIT_NAMES = ("train", "val", "test")
SPLITS_FILE = "splits.npz"


def _size(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"split: {key} must be a non-negative integer, got {value!r}")
    return int(value)


def make_splits(
    n_frames: int,
    train_size: int,
    val_size: int,
    test_size: int | None = None,
    seed: int = 1,
    *,
    source=None,
) -> dict[str, np.ndarray]:
    """Draw a seeded random split of ``n_frames`` frames.

    The frames are permuted with ``numpy.random.default_rng(seed).permutation(n_frames)``; train is
    the first ``train_size`` of the permutation, val the next ``val_size``, test the next
    ``test_size`` (None = all the rest). Each part is returned sorted.

    Args:
        n_frames: frames in the file.
        train_size, val_size, test_size: frames per part (test None = the rest).
        seed: the permutation seed.
        source: the file the frames come from, named in the error message.

    Raises:
        DataError: if the file has fewer frames than the split needs (names the file).
    """
    n_frames = _size(n_frames, "n_frames")
    train = _size(train_size, "train_size")
    val = _size(val_size, "val_size")
    need = train + val + (0 if test_size is None else _size(test_size, "test_size"))
    if need > n_frames:
        where = f"{source}: " if source is not None else ""
        raise DataError(
            f"{where}has {n_frames} frames, fewer than the split needs "
            f"({train} train + {val} val + {test_size if test_size is not None else 0} test = {need})"
        )
    perm = np.random.default_rng(seed).permutation(n_frames)
    test_end = n_frames if test_size is None else train + val + int(test_size)
    parts = {
        "train": perm[:train],
        "val": perm[train : train + val],
        "test": perm[train + val : test_end],
    }
    return {k: np.sort(v).astype(np.int64) for k, v in parts.items()}


def check_splits(splits, n_frames: int | None = None, source=None) -> dict[str, np.ndarray]:
    """Validate a split dict (keys train/val/test; integer, disjoint, in range); return int64 copies."""
    where = f"{source}: " if source is not None else "split: "
    out = {}
    for key in SPLIT_NAMES:
        if key not in splits:
            raise DataError(f"{where}missing split {key!r}")
        arr = np.asarray(splits[key])
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise DataError(f"{where}split {key!r} must be a 1-d integer array, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        if arr.size and arr.min() < 0:
            raise DataError(f"{where}split {key!r} has negative frame indices")
        if n_frames is not None and arr.size and arr.max() >= n_frames:
            raise DataError(
                f"{where}split {key!r} refers to frame {int(arr.max())} but the data has {n_frames} frames"
            )
        if np.unique(arr).size != arr.size:
            raise DataError(f"{where}split {key!r} repeats frame indices")
        out[key] = arr
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = np.intersect1d(out[a], out[b])
        if common.size:
            raise DataError(f"{where}splits {a!r} and {b!r} share {common.size} frame(s), e.g. {int(common[0])}")
    return out


def save_splits(splits, folder, *, n_frames: int | None = None, source=None) -> Path:
    """Write ``<folder>/splits.npz`` (train, val, test int64 arrays; optional n_frames and source).

    The write is atomic (:func:`~scalable_equiformer.checkpoint_io.atomic_write_bytes`). Returns the file path.
    """
    splits = check_splits(splits, n_frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SPLITS_FILE
    payload = dict(splits)
    if n_frames is not None:
        payload["n_frames"] = np.int64(n_frames)
    if source is not None:
        payload["source"] = np.str_(str(source))
    buf = io.BytesIO()
    np.savez(buf, **payload)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
    return path


def load_splits(folder, n_frames: int | None = None) -> dict[str, np.ndarray]:
    """Read ``<folder>/splits.npz`` (or a path to the file itself) written by :func:`save_splits`.

    If ``n_frames`` is given, it is checked against the stored frame count and the indices.
    """
    path = Path(folder)
    if path.is_dir() or path.suffix != ".npz":
        path = path / SPLITS_FILE
    if not path.is_file():
        raise DataError(f"{path}: splits file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: corrupt splits file ({type(exc).__name__})") from exc
    stored_n = int(data["n_frames"]) if "n_frames" in data else None
    if n_frames is not None and stored_n is not None and stored_n != n_frames:
        raise DataError(f"{path}: splits were made for {stored_n} frames, the data has {n_frames}")
    return check_splits(data, n_frames if n_frames is not None else stored_n, source=path)


def _find_split_dir(folder) -> Path:
    folder = Path(folder)
    for cand in (folder, folder / "rmd17" / "splits", folder / "splits"):
        if (cand / "index_train_01.csv").is_file():
            return cand
    raise DataError(
        f"{folder}: no rMD17 index split files (index_train_01.csv) in it, in rmd17/splits/ or in "
        f"splits/; they come with the rMD17 archive: python tools/download.py rmd17_<molecule> --root {folder}"
    )


def _read_index_csv(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1, delimiter=",")
    except ValueError as exc:
        raise DataError(f"{path}: not a list of frame indices ({exc})") from exc
    values = values.ravel()
    if values.size == 0 or not np.all(values == np.round(values)) or values.min() < 0:
        raise DataError(f"{path}: not a list of non-negative integer frame indices")
    return values.astype(np.int64)


def load_index_split(
    folder,
    split: int = 1,
    *,
    val_size: int = 0,
    seed: int = 1,
    n_frames: int | None = None,
) -> dict[str, np.ndarray]:
    """Read one of the 5 published rMD17 index splits.

    The rMD17 archive holds ``rmd17/splits/index_train_0{k}.csv`` and ``index_test_0{k}.csv`` for
    k = 1..5 (1000 frame indices each, one per line, 0-based into every ``rmd17_<mol>.npz``).

    Args:
        folder: the splits folder itself, or a data root holding ``rmd17/splits/`` (or ``splits/``).
        split: which published split, 1..5 (file suffix ``_01`` .. ``_05``).
        val_size: frames moved from the published train indices to ``val`` (seeded), e.g. 50 for
            950 train / 50 val; 0 gives an empty val.
        seed: seed of that validation draw.
        n_frames: if given, indices are checked to be < n_frames.

    Returns:
        dict(train, val, test) of sorted int64 arrays.
    """
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or not 1 <= split <= 5:
        raise DataError(f"rMD17 index split must be 1..5 (files index_train_01..05.csv), got {split!r}")
    d = _find_split_dir(folder)
    train = _read_index_csv(d / f"index_train_0{split}.csv")
    test = _read_index_csv(d / f"index_test_0{split}.csv")
    if val_size > train.size:
        raise DataError(f"{d / f'index_train_0{split}.csv'}: has {train.size} frames, fewer than val_size={val_size}")
    perm = np.random.default_rng(seed).permutation(train.size)
    val = train[perm[:val_size]]
    train = train[perm[val_size:]]
    splits = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    return check_splits(splits, n_frames, source=d)


__all__ = ["make_splits", "save_splits", "load_splits", "check_splits", "load_index_split", "SPLITS_FILE"]
