#!/usr/bin/env python
"""Download catalog datasets (MD17, rMD17, MD22) into a data root, checked.

    python tools/download.py md22_AT-AT md17_aspirin --root data/
    python tools/download.py rmd17_aspirin --root data/          # fetches and unpacks the archive

Each file is downloaded to a temporary file in the target folder and moved into place with
``os.replace`` only after it passed every check, so a partial or bad download never looks complete
(the temporary file is deleted). Checks: the file reads as an sGDML / rMD17 npz (keys, shapes, no
NaN), the sGDML md5 fingerprint stored in the file equals the one recomputed from z, R, E, F
(MD17/MD22; rMD17 files carry none), and atoms and frames equal the catalog's. rMD17 comes as one
archive (``rmd17.tar.bz2``): the requested molecules are extracted to ``<root>/rmd17/npz_data/`` and
the published index splits to ``<root>/rmd17/splits/``.

``--url-base URL`` replaces the publisher's address (the file name is appended), e.g. a mirror or a
local test server. Exit status 0 on success; otherwise one line ``error: ...`` and status 1.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as every tool: the checkout's package

from scalable_equiformer.data import catalog  # noqa: E402
from scalable_equiformer.data.sgdml import read_npz  # noqa: E402
from scalable_equiformer.errors import DataError, UserError  # noqa: E402

CHUNK = 1 << 20


def _url_for(file_name: str, default_url: str, url_base: str | None) -> str:
    return f"{url_base.rstrip('/')}/{file_name}" if url_base else default_url


def fetch(url: str, folder: Path, label: str, timeout: float = 60.0) -> Path:
    """Download ``url`` into a temporary file in ``folder`` (with a tqdm progress bar); return it.

    Raises DataError (and deletes the temporary file) on HTTP errors and incomplete transfers.
    """
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{label}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(f"{url}: cannot download ({reason})") from exc
        with resp, os.fdopen(fd, "wb") as out:
            fd = None
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                      file=sys.stderr, leave=False) as bar:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise DataError(f"{url}: download interrupted after {got} bytes ({exc})") from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise DataError(f"{url}: download incomplete ({got} of {total} bytes)")
        if got == 0:
            raise DataError(f"{url}: server sent an empty file")
        return tmp
    except BaseException:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def verify(path: Path, info: catalog.DatasetInfo, shown: str, require_md5: bool) -> None:
    """Check a downloaded npz against the catalog entry; DataError naming ``shown`` otherwise."""
    try:
        raw = read_npz(path, verify_md5=True)
    except DataError as exc:
        raise DataError(str(exc).replace(str(path), shown)) from exc
    if require_md5 and raw.md5 is None:
        raise DataError(f"{shown}: no md5 fingerprint stored in the file (sGDML files carry one)")
    n, natoms = raw.positions.shape[0], raw.z.size
    if natoms != info.num_atoms:
        raise DataError(f"{shown}: has {natoms} atoms, the catalog says {info.name} has {info.num_atoms}")
    if n != info.num_frames:
        raise DataError(f"{shown}: has {n} frames, the catalog says {info.name} has {info.num_frames}")


def download_npz(info: catalog.DatasetInfo, root: Path, url_base: str | None) -> Path:
    """MD17 / MD22: one npz file per dataset."""
    url = _url_for(info.file_name, info.url, url_base)
    target = root / info.file_name
    tmp = fetch(url, root, info.file_name)
    _verify_and_replace(tmp, target, info, f"{info.file_name} from {url}", require_md5=True)
    return target


def _verify_and_replace(tmp: Path, target: Path, info: catalog.DatasetInfo, label: str, require_md5: bool) -> None:
    """Check a downloaded or extracted file, then move it over ``target``; the temporary file never stays."""
    try:
        verify(tmp, info, label, require_md5=require_md5)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def download_rmd17(infos: list[catalog.DatasetInfo], root: Path, url_base: str | None,
                   keep_archive: bool = False) -> list[Path]:
    """rMD17: fetch the archive once; extract the requested molecules and the index splits."""
    url = _url_for(catalog.RMD17_ARCHIVE_NAME, catalog.RMD17_ARCHIVE_URL, url_base)
    archive = fetch(url, root, catalog.RMD17_ARCHIVE_NAME)
    done: list[Path] = []
    try:
        try:
            tar = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{catalog.RMD17_ARCHIVE_NAME} from {url}: not a readable tar archive ({exc})") from exc
        with tar:
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            for info in infos:
                m = members.get(info.archive_member)
                if m is None:
                    raise DataError(f"{catalog.RMD17_ARCHIVE_NAME} from {url}: no member {info.archive_member}")
                target = root / info.archive_member
                tmp = _extract(tar, m, target.parent)
                _verify_and_replace(tmp, target, info, f"{info.archive_member} in {url}", require_md5=False)
                done.append(target)
            for name, m in members.items():
                if name.startswith(catalog.RMD17_SPLIT_DIR + "/") and name.endswith(".csv"):
                    target = root / name
                    tmp = _extract(tar, m, target.parent)
                    os.replace(tmp, target)
        if keep_archive:
            os.replace(archive, root / catalog.RMD17_ARCHIVE_NAME)
    finally:
        archive.unlink(missing_ok=True)
    return done


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, folder: Path) -> Path:
    """Copy one archive member into a temporary file in ``folder`` (no path from the archive is
    used as a file name, so nothing is written outside ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{Path(member.name).name}.", suffix=".part")
    try:
        src = tar.extractfile(member)
        if src is None:
            raise DataError(f"archive member {member.name} is not a file")
        with src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="NAME", help="catalog names, e.g. md22_AT-AT")
    parser.add_argument("--root", required=True, help="data folder to download into")
    parser.add_argument("--url-base", default=None,
                        help="download from URL/<file name> instead of the publisher (mirror, test server)")
    parser.add_argument("--force", action="store_true", help="download even if the file is present")
    parser.add_argument("--keep-archive", action="store_true", help="keep rmd17.tar.bz2 after extracting")
    args = parser.parse_args(argv)
    root = Path(args.root)
    try:
        infos = [catalog.get_info(n) for n in args.names]
        pending = []
        for info in infos:
            present = next((p for p in info.candidate_paths(root) if p.is_file()), None)
            if present is not None and not args.force:
                print(f"{info.name}: already present at {present} (use --force to download again)")
            else:
                pending.append(info)
        for info in [i for i in pending if i.family != "rmd17"]:
            path = download_npz(info, root, args.url_base)
            print(f"{info.name}: {path} (md5, {info.num_atoms} atoms, {info.num_frames} frames checked)")
        rmd = [i for i in pending if i.family == "rmd17"]
        if rmd:
            for path, info in zip(download_rmd17(rmd, root, args.url_base, args.keep_archive), rmd):
                print(f"{info.name}: {path} ({info.num_atoms} atoms, {info.num_frames} frames checked)")
            print(f"rMD17 index splits: {root / catalog.RMD17_SPLIT_DIR}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no partial file was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
