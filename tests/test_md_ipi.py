"""i-PI (:mod:`scalable_equiformer.md.ipi`): NVT and 4-bead PIMD runs through the real ``i-pi``
server and the client on a UNIX socket, with the potential and forces i-PI received equal to the
calculator's; the socket protocol over TCP (``TCP_NODELAY``); bad input refused in one line.

The runs are a few steps each (i-PI and the client are subprocesses with timeouts). Exactness: the
i-PI inputs subtract the calculator's energy on the input geometry (i-PI's ``<offset>``), so the
step-0 potential i-PI prints (9 significant digits) is the difference itself; every bead starts on
the input geometry, and i-PI's step-0 forces are read from its binary trajectory (float64).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipi", reason="i-PI is in the md extra: pip install '.[md]'")

import ase.io  # noqa: E402

from scalable_equiformer.calculator import EquiformerCalculator  # noqa: E402
from scalable_equiformer.errors import UserError  # noqa: E402
from scalable_equiformer.md import ipi  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FORCES_BIN = "\n    <trajectory filename='frc' stride='100000' format='bin'> forces </trajectory>"


@pytest.fixture
def socket_name(request):
    """A UNIX socket name of this test (``/tmp/ipi_<name>``), removed afterwards whatever happens."""
    name = f"se_test_{os.getpid()}_{request.node.name[:40]}"
    yield name
    Path(ipi.SOCKET_PREFIX + name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def reference(atat_checkpoint, tmp_path_factory):
    """The example xyz (shipped AT-AT frame 0) and the calculator's energy (eV) and forces (eV/Å) on it."""
    xyz = ipi.write_examples(tmp_path_factory.mktemp("ref"))["structure"]
    atoms = ase.io.read(xyz)
    atoms.calc = EquiformerCalculator(atat_checkpoint)
    return {"xyz": xyz, "energy": atoms.get_potential_energy(), "forces": atoms.get_forces().copy()}


def _client_cmd(checkpoint, structure, name, *extra):
    return [sys.executable, "-m", "scalable_equiformer.md.ipi", "--checkpoint", str(checkpoint), "--structure",
            str(structure), "--unix", name, "--device", "cpu", *extra]


def _step0_forces(path: Path) -> np.ndarray:
    """Forces (hartree/bohr) of the first frame of an i-PI binary trajectory: cell (9 float64),
    atom count (int64), 3N float64."""
    raw = path.read_bytes()
    nat = int(np.frombuffer(raw[72:80], np.int64)[0])
    return np.frombuffer(raw[80:80 + 24 * nat], np.float64).reshape(nat, 3)


def _run(tmp_path, checkpoint, reference, socket_name, mode, steps):
    files = ipi.write_examples(tmp_path, socket_name=socket_name, steps=steps, offset_eV=reference["energy"],
                               extra_output=FORCES_BIN)
    result = ipi.run(files[mode].name, socket_name=socket_name, workdir=tmp_path, timeout_s=300,
                     client_cmd=_client_cmd(checkpoint, files["structure"].name, socket_name, "--stats", "stats.json"))
    assert not Path(ipi.SOCKET_PREFIX + socket_name).exists()  # cleaned up
    return result, ipi.read_properties(tmp_path / f"{mode}.out")


def test_nvt_through_ipi_reports_the_calculators_potential_and_forces(tmp_path, atat_checkpoint, reference,
                                                                        socket_name):
    result, props = _run(tmp_path, atat_checkpoint, reference, socket_name, "nvt", steps=4)
    np.testing.assert_array_equal(props["step"], np.arange(5))
    # step 0 is the input geometry: i-PI's potential minus the calculator's energy (the offset)
    assert abs(props["potential"][0]) <= 1e-9  # eV, of |E| ~ 3e3 eV: 3e-13 relative
    assert np.all(props["potential"][1:] != 0.0) and np.all(np.isfinite(props["temperature"]))
    forces = _step0_forces(tmp_path / "nvt.frc_0.bin") / ipi.FORCE_TO_ATOMIC
    np.testing.assert_allclose(forces, reference["forces"], rtol=1e-12, atol=1e-13)
    assert "5 force calls" in result["client_log"]  # the initial forces, then one call per step


def test_pimd_4_beads_through_ipi_reports_the_calculators_potential_and_forces(tmp_path, atat_checkpoint,
                                                                               reference, socket_name):
    result, props = _run(tmp_path, atat_checkpoint, reference, socket_name, "pimd", steps=2)
    np.testing.assert_array_equal(props["step"], np.arange(3))
    assert abs(props["potential"][0]) <= 1e-9  # every bead starts on the input geometry
    assert props["potential"][1] != 0.0
    for bead in range(4):
        forces = _step0_forces(tmp_path / f"pimd.frc_{bead}.bin") / ipi.FORCE_TO_ATOMIC
        np.testing.assert_allclose(forces, reference["forces"], rtol=1e-12, atol=1e-13)
    assert "12 force calls" in result["client_log"]  # 4 beads x (initial + 2 steps)


def test_ipis_own_python_driver_runs_the_potential(tmp_path, atat_checkpoint, reference, socket_name):
    """``i-pi-py_driver -m custom -P .../ipi_pes.py``: the route of i-PI's own Python driver."""
    import scalable_equiformer.md.ipi_pes as pes

    files = ipi.write_examples(tmp_path, socket_name=socket_name, steps=1, offset_eV=reference["energy"])
    cmd = [str(Path(sys.executable).parent / "i-pi-py_driver"), "-m", "custom", "-P", pes.__file__, "-u", "-a",
           socket_name, "-o", f"template={files['structure'].name},checkpoint={atat_checkpoint},device=cpu"]
    ipi.run(files["nvt"].name, client_cmd=cmd, socket_name=socket_name, workdir=tmp_path, timeout_s=300)
    assert abs(ipi.read_properties(tmp_path / "nvt.out")["potential"][0]) <= 1e-9


def test_the_committed_examples_are_what_write_examples_writes(tmp_path):
    written = ipi.write_examples(tmp_path)
    for path in written.values():
        assert (ROOT / "examples" / "ipi" / path.name).read_text() == path.read_text(), path.name


def test_the_wire_units_are_ipis():
    from ipi.utils.units import unit_to_internal

    assert ipi.BOHR_PER_ANGSTROM == unit_to_internal("length", "angstrom", 1.0)
    assert ipi.HARTREE_PER_EV == unit_to_internal("energy", "electronvolt", 1.0)


# -- the protocol on TCP, against a minimal i-PI server ---------------------------------------------


class FakeServer(threading.Thread):
    """The server side of one i-PI exchange on TCP: handshake, one structure, its forces, EXIT (the
    first messages in one send, as i-PI's consolidated mode does)."""

    def __init__(self, pos_bohr: np.ndarray, cell_bohr: np.ndarray):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pos, self.cell = pos_bohr, cell_bohr
        self.replies: dict = {}

    def run(self):
        try:
            self._exchange()
        except ConnectionError as exc:  # a client that refused the structure closes the socket
            self.replies["closed"] = exc
        finally:
            self.listener.close()

    def _exchange(self):
        conn, _ = self.listener.accept()
        conn.settimeout(60)
        with conn:
            recv = lambda n: ipi._recv_exact(conn, n)  # noqa: E731
            conn.sendall(ipi.STATUS)
            self.replies["status0"] = recv(12)
            conn.sendall(ipi.INIT + np.int32(0).tobytes() + np.int32(3).tobytes() + b"abc" + ipi.STATUS)
            self.replies["status1"] = recv(12)
            nat = len(self.pos)
            conn.sendall(ipi.POSDATA + self.cell.tobytes() + np.linalg.inv(self.cell).tobytes()
                         + np.int32(nat).tobytes() + self.pos.tobytes() + ipi.STATUS)
            self.replies["status2"] = recv(12)
            conn.sendall(ipi.GETFORCE)
            self.replies["forceready"] = recv(12)
            self.replies["pot"] = np.frombuffer(recv(8), np.float64)[0]
            n = int(np.frombuffer(recv(4), np.int32)[0])
            self.replies["forces"] = np.frombuffer(recv(24 * n), np.float64).reshape(n, 3)
            self.replies["virial"] = np.frombuffer(recv(72), np.float64)
            self.replies["extra"] = recv(int(np.frombuffer(recv(4), np.int32)[0]))
            conn.sendall(ipi.EXIT)


@pytest.fixture(scope="module")
def driver(atat_checkpoint, reference):
    return ipi.EquiformerDriver.from_files(atat_checkpoint, reference["xyz"], device="cpu")


def test_tcp_client_sets_tcp_nodelay_and_answers_in_ipis_units(driver, reference):
    pos = ase.io.read(reference["xyz"]).positions * ipi.BOHR_PER_ANGSTROM
    server = FakeServer(pos, np.eye(3) * 100.0 * ipi.BOHR_PER_ANGSTROM)
    server.start()
    client = ipi.Client(driver, ipi.connect(host="127.0.0.1", port=server.port, wait_s=10))
    assert client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert client.serve() == "exit"
    server.join(30)
    r = server.replies
    assert (r["status0"], r["status1"], r["status2"], r["forceready"]) == (ipi.NEEDINIT, ipi.READY, ipi.HAVEDATA,
                                                                           ipi.FORCEREADY)
    assert r["pot"] / ipi.HARTREE_PER_EV == pytest.approx(reference["energy"], rel=1e-14)
    np.testing.assert_allclose(r["forces"] / ipi.FORCE_TO_ATOMIC, reference["forces"], rtol=1e-12, atol=1e-13)
    assert not r["virial"].any() and r["extra"] == b""


def test_an_atom_count_other_than_the_structures_is_refused_in_one_line(driver, reference):
    pos = ase.io.read(reference["xyz"]).positions[:21] * ipi.BOHR_PER_ANGSTROM
    server = FakeServer(pos, np.eye(3) * 100.0 * ipi.BOHR_PER_ANGSTROM)
    server.start()
    client = ipi.Client(driver, ipi.connect(host="127.0.0.1", port=server.port, wait_s=10))
    with pytest.raises(UserError, match=r"atat\.xyz: has 60 atoms but i-PI sent 21") as err:
        client.serve()
    assert "\n" not in str(err.value)
    server.join(30)
    assert isinstance(server.replies.get("closed"), ConnectionError)  # the client hung up


def test_a_box_too_small_for_the_isolated_molecule_is_refused(driver, reference):
    pos = ase.io.read(reference["xyz"]).positions * ipi.BOHR_PER_ANGSTROM
    driver.compute_structure(np.zeros((3, 3)), pos)  # no box: fine
    driver.compute_structure(np.eye(3) * 100.0 * ipi.BOHR_PER_ANGSTROM, pos)
    with pytest.raises(UserError, match=r"atat\.xyz: the model is for isolated molecules, but the i-PI box is 15 Å "
                                        r"wide along cell vector 1 .* periodic images would interact"):
        driver.compute_structure(np.eye(3) * 15.0 * ipi.BOHR_PER_ANGSTROM, pos)


def test_the_client_refuses_bad_input_in_one_line(tmp_path, atat_checkpoint, reference):
    z, pos = ipi.shipped_frame("atat")
    z = z.copy()
    z[0] = 9  # fluorine: never in the AT-AT training frames
    bad = ipi.write_structure(tmp_path / "with_f.xyz", z, pos)
    cases = {bad: r"with_f\.xyz: .*element F \(Z=9\) never seen in training",
             tmp_path / "missing.xyz": r"missing\.xyz: structure file not found"}
    for structure, message in cases.items():
        proc = subprocess.run(_client_cmd(atat_checkpoint, structure, "se_test_never_used", "--wait", "1"),
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert __import__("re").search(message, lines[0]), lines[0]
    proc = subprocess.run(_client_cmd(atat_checkpoint, reference["xyz"], "se_test_no_server", "--wait", "0.2"),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no i-PI server at UNIX socket "
                                                                   "/tmp/ipi_se_test_no_server"), proc.stderr


def test_an_ipi_run_whose_client_has_another_molecule_fails_in_one_line(tmp_path, atat_checkpoint, socket_name):
    files = ipi.write_examples(tmp_path, socket_name=socket_name, steps=1)
    z, pos = ipi.shipped_frame("aspirin")
    aspirin = ipi.write_structure(tmp_path / "aspirin.xyz", z, pos)
    with pytest.raises(UserError, match=r"client of nvt\.xml exited with 2: error: aspirin\.xyz: has 21 atoms but "
                                        r"i-PI sent 60"):
        ipi.run(files["nvt"].name, socket_name=socket_name, workdir=tmp_path, timeout_s=300,
                client_cmd=_client_cmd(atat_checkpoint, aspirin.name, socket_name))
    assert not Path(ipi.SOCKET_PREFIX + socket_name).exists()


def test_bench_ipi_reports_its_figures(atat_checkpoint):
    """tools/bench_md_ipi.py's bench_ipi: the figures and their arithmetic (no timing asserted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_md_ipi", ROOT / "tools" / "bench_md_ipi.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.bench_ipi(atat_checkpoint, None, steps=3, timestep_fs=0.5, transport="tcp", device="cpu")
    assert (r["steps"], r["force_calls"], r["atoms"], r["transport"]) == (3, 4, 60, "tcp")
    assert r["ns_per_day"] == pytest.approx(0.5e-6 * 86400e3 / r["ms_per_step"])
    assert r["ms_compute_per_step"] + r["ms_other_per_step"] == pytest.approx(r["ms_per_step"])
    assert 0 < r["compute_share"] <= 1.5  # the mean call against the mean gap: close to, not bounded by, 1
