"""tools/download.py end to end against a local HTTP server on 127.0.0.1 (no internet needed)."""

import dataclasses
import functools
import http.server
import importlib.util
import io
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from scalable_equiformer.data import CATALOG, dataset_md5, load_dataset, load_index_split

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("download_tool", REPO / "tools" / "download.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


download = _load_tool()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path.startswith("/short/"):  # announces more bytes than it sends
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04" + b"\0" * 100)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(serve folder, base URL) of a threaded HTTP server on 127.0.0.1, stopped after the test."""
    folder = tmp_path / "srv"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _sgdml_file(path: Path, n=6, N=5, md5=None):
    rng = np.random.default_rng(0)
    arrays = dict(R=rng.normal(size=(n, N, 3)), E=rng.normal(size=(n, 1)) - 1000.0,
                  F=rng.normal(size=(n, N, 3)), z=np.array([6, 1, 1, 1, 1][:N], np.uint8))
    arrays["md5"] = np.bytes_((md5 or dataset_md5(arrays)).encode())
    arrays.update(name=np.str_("tiny"), theory=np.str_("test"), type=np.str_("d"))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


@pytest.fixture
def tiny_atat(monkeypatch):
    """Pretend md22_AT-AT has 5 atoms and 6 frames, so a tiny file passes the catalog check."""
    info = dataclasses.replace(CATALOG["md22_AT-AT"], num_atoms=5, num_frames=6)
    monkeypatch.setitem(CATALOG, "md22_AT-AT", info)
    return info


def _leftovers(root: Path):
    return [p.name for p in root.rglob("*") if p.name.endswith(".part")]


def test_good_file(server, tmp_path, tiny_atat, capsys):
    srv, url = server
    _sgdml_file(srv / "md22_AT-AT.npz")
    root = tmp_path / "data"
    assert download.main(["md22_AT-AT", "--root", str(root), "--url-base", url]) == 0
    assert (root / "md22_AT-AT.npz").read_bytes() == (srv / "md22_AT-AT.npz").read_bytes()
    assert _leftovers(root) == []
    ds = load_dataset("md22_AT-AT", root=root)
    assert len(ds) == 6 and ds.num_atoms == 5
    # second call: already there, nothing fetched
    assert download.main(["md22_AT-AT", "--root", str(root), "--url-base", url + "/nowhere"]) == 0
    assert "already present" in capsys.readouterr().out


def test_md5_mismatch_keeps_nothing(server, tmp_path, tiny_atat, capsys):
    srv, url = server
    _sgdml_file(srv / "md22_AT-AT.npz", md5="0" * 32)
    root = tmp_path / "data"
    assert download.main(["md22_AT-AT", "--root", str(root), "--url-base", url]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "md5 fingerprint mismatch" in err and url in err
    assert not (root / "md22_AT-AT.npz").exists() and _leftovers(root) == []


def test_catalog_mismatch(server, tmp_path, monkeypatch, capsys):
    srv, url = server
    _sgdml_file(srv / "md22_AT-AT.npz")  # 5 atoms, catalog says 60
    root = tmp_path / "data"
    assert download.main(["md22_AT-AT", "--root", str(root), "--url-base", url]) == 1
    assert "has 5 atoms, the catalog says md22_AT-AT has 60" in capsys.readouterr().err
    assert list(root.iterdir()) == []


def test_http_404_and_truncated_transfer(server, tmp_path, tiny_atat, capsys):
    srv, url = server
    root = tmp_path / "data"
    assert download.main(["md22_AT-AT", "--root", str(root), "--url-base", url]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert download.main(["md22_AT-AT", "--root", str(root), "--url-base", url + "/short"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "download" in err and ("incomplete" in err or "interrupted" in err), err
    assert list(root.iterdir()) == []
    assert download.main(["md22_ATAT", "--root", str(root)]) == 1
    assert "did you mean: md22_AT-AT" in capsys.readouterr().err


def test_not_an_npz_served(server, tmp_path, tiny_atat, capsys):
    srv, url = server
    (srv / "md22_AT-AT.npz").write_text("<html>not found</html>")
    root = tmp_path / "data"
    assert download.main(["md22_AT-AT", "--root", str(root), "--url-base", url]) == 1
    assert "not an npz file" in capsys.readouterr().err
    assert list(root.iterdir()) == []


def test_rmd17_archive(server, tmp_path, monkeypatch):
    srv, url = server
    shared = Path(__file__).resolve().parents[2] / "shared"
    real = shared / "data" / "real" / "rmd17_ethanol_100_metatrain_rmd17keys.npz"
    if not real.exists():
        pytest.skip(f"shared data file {real} not present")
    monkeypatch.setitem(CATALOG, "rmd17_ethanol", dataclasses.replace(CATALOG["rmd17_ethanol"], num_frames=100))
    with tarfile.open(srv / "rmd17.tar.bz2", "w:bz2") as tar:
        tar.add(real, arcname="rmd17/npz_data/rmd17_ethanol.npz")
        for k in range(1, 6):
            for part, lo in (("train", 0), ("test", 50)):
                data = "\n".join(str(i) for i in range(lo + k, lo + k + 40)).encode()
                ti = tarfile.TarInfo(f"rmd17/splits/index_{part}_0{k}.csv")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    root = tmp_path / "data"
    assert download.main(["rmd17_ethanol", "--root", str(root), "--url-base", url]) == 0
    assert (root / "rmd17" / "npz_data" / "rmd17_ethanol.npz").is_file()
    assert not (root / "rmd17.tar.bz2").exists() and _leftovers(root) == []
    ds = load_dataset("rmd17_ethanol", root=root)
    assert len(ds) == 100 and ds.num_atoms == 9
    s = load_index_split(root, split=2, val_size=5, n_frames=len(ds))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (35, 5, 40)


def test_command_line_one_line_error(server, tmp_path):
    srv, url = server
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "download.py"), "md22_AT-AT", "--root", str(tmp_path / "d"),
         "--url-base", url],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "HTTP 404" in lines[-1]
    assert "Traceback" not in proc.stderr
