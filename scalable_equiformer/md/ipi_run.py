"""i-PI inputs and runs: the xyz and XML inputs of :mod:`.ipi`'s client (NVT, path-integral
MD), the shipped molecules' examples (``examples/ipi``), and a run of the real ``i-pi`` server with
the client, used by ``tools/md_ipi.py``, the benchmark and the tests. Names are re-exported by
:mod:`.ipi`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import UserError

# -- i-PI inputs and runs --------------------------------------------------------------------------


def write_structure(path: Union[str, Path], numbers: Sequence[int], positions: np.ndarray, box: float = 100.0,
                    title: str = "") -> Path:
    """Write an xyz file that i-PI and :func:`read_structure` both read: positions in Å at full
    precision, i-PI's ``# CELL(abcABC): ... positions{angstrom} cell{angstrom}`` comment (a cubic
    box of ``box`` Å)."""
    from ase.data import chemical_symbols

    path = Path(path)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    lines = [str(len(positions)), f"# CELL(abcABC): {box:g} {box:g} {box:g} 90 90 90 positions{{angstrom}} "
                                  f"cell{{angstrom}} {title}".rstrip()]
    lines += [f"{chemical_symbols[int(z)]:<2s} {x!r:>22} {y!r:>22} {w!r:>22}" for z, (x, y, w) in
              zip(numbers, positions.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return path


def input_xml(structure: Union[str, Path], *, socket_name: str = "equiformer", mode: str = "nvt", steps: int = 1000,
              timestep_fs: float = 0.5, temperature_K: float = 300.0, beads: Optional[int] = None,
              tau_fs: float = 100.0, seed: int = 31415, prefix: str = "simulation", stride: int = 10,
              properties_stride: int = 1, offset_eV: float = 0.0, tcp_port: Optional[int] = None,
              extra_output: str = "") -> str:
    """An i-PI input: ``mode`` "nvt" (one bead, SVR thermostat) or "pimd" (``beads`` beads, 4 by
    default; PILE-L thermostat), starting from ``structure`` (positions in Å, declared with
    ``units='angstrom'``), at ``temperature_K``. Writes ``<prefix>.out`` (step, time, conserved
    quantity, temperature, potential in eV, every ``properties_stride`` steps) and the centroid
    positions (Å) every ``stride`` steps. ``offset_eV`` is subtracted from the reported potential
    (i-PI's ``<offset>``); ``extra_output``: more ``<output>`` elements (XML). The forcefield is a UNIX
    socket ``socket_name`` (or TCP at ``tcp_port``)."""
    if mode not in ("nvt", "pimd"):
        raise UserError(f"i-PI mode must be nvt or pimd, not {mode!r}")
    nbeads = 1 if mode == "nvt" else int(beads or 4)
    if nbeads < 1 or int(steps) < 0:
        raise UserError(f"i-PI input: beads must be >= 1 and steps >= 0 (got {nbeads}, {steps})")
    thermostat = ("<thermostat mode='svr'><tau units='femtosecond'>{tau}</tau></thermostat>" if nbeads == 1 else
                  "<thermostat mode='pile_l'><tau units='femtosecond'>{tau}</tau></thermostat>").format(tau=tau_fs)
    if tcp_port is None:
        sock = f"<ffsocket name='equiformer' mode='unix' pbc='false'><address>{socket_name}</address>"
    else:
        sock = ("<ffsocket name='equiformer' mode='inet' pbc='false'><address>localhost</address>"
                f"<port>{tcp_port}</port>")
    trajectory = (f"<trajectory filename='pos' stride='{stride}' format='xyz' cell_units='angstrom'> "
                  "x_centroid{angstrom} </trajectory>")
    return f"""<!-- i-PI input written by scalable_equiformer.md.ipi.input_xml: {mode.upper()}, {nbeads} bead(s) -->
<simulation verbosity='low' safe_stride='{max(1, int(steps))}'>
  <output prefix='{prefix}'>
    <properties stride='{properties_stride}' filename='out' flush='1'>
      [ step, time{{picosecond}}, conserved{{electronvolt}}, temperature{{kelvin}}, potential{{electronvolt}} ]
    </properties>
    {trajectory}{extra_output}
  </output>
  <total_steps>{int(steps)}</total_steps>
  <prng><seed>{int(seed)}</seed></prng>
  {sock}<latency>1e-4</latency><offset units='electronvolt'>{offset_eV!r}</offset></ffsocket>
  <system>
    <initialize nbeads='{nbeads}'>
      <file mode='xyz' units='angstrom'>{structure}</file>
      <velocities mode='thermal' units='kelvin'>{temperature_K:g}</velocities>
    </initialize>
    <forces><force forcefield='equiformer'/></forces>
    <ensemble><temperature units='kelvin'>{temperature_K:g}</temperature></ensemble>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'>{timestep_fs:g}</timestep>
        {thermostat}
      </dynamics>
    </motion>
  </system>
</simulation>
"""


#: the shipped molecules the examples start from (frame 0 of scalable_equiformer/demo_data)
SHIPPED = {"atat": "AT-AT_xtb_500K_20frames.npz", "aspirin": "aspirin_xtb_500K.npz"}


def shipped_frame(molecule: str = "atat") -> tuple[np.ndarray, np.ndarray]:
    """``(atomic numbers, positions Å)`` of frame 0 of a shipped demo molecule ("atat", "aspirin")."""
    if molecule not in SHIPPED:
        raise UserError(f"shipped molecules are {', '.join(SHIPPED)}, not {molecule!r}")
    with np.load(Path(__file__).resolve().parents[1] / "demo_data" / SHIPPED[molecule]) as data:
        return data["z"].astype(np.int64), data["R"][0].astype(np.float64)


def write_examples(folder: Union[str, Path], molecule: str = "atat", socket_name: str = "equiformer",
                   steps: int = 1000, **kwargs) -> dict[str, Path]:
    """The i-PI example inputs in ``folder``: ``<molecule>.xyz`` (frame 0 of the shipped file, in a
    100 Å box), ``nvt.xml`` and ``pimd.xml`` (4 beads) on the UNIX socket ``socket_name``;
    ``kwargs`` go to :func:`input_xml`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    numbers, positions = shipped_frame(molecule)
    xyz = write_structure(folder / f"{molecule}.xyz", numbers, positions,
                          title=f"frame 0 of scalable_equiformer/demo_data/{SHIPPED[molecule]}")
    out = {"structure": xyz}
    for mode in ("nvt", "pimd"):
        out[mode] = folder / f"{mode}.xml"
        out[mode].write_text(input_xml(xyz.name, socket_name=socket_name, mode=mode, steps=steps, prefix=mode,
                                       **kwargs))
    return out


def ipi_executable() -> str:
    """The ``i-pi`` launcher beside this Python (a venv need not be activated), else on PATH."""
    here = Path(sys.executable).parent / "i-pi"
    found = str(here) if here.is_file() else shutil.which("i-pi")
    if found is None:
        raise UserError("i-PI is not installed (no `i-pi` beside this Python or on PATH): pip install '.[md]'")
    return found


def read_properties(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """Columns of an i-PI properties file (``<prefix>.out``) by name (``potential``, ``step``...)."""
    import re

    names, rows = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            m = re.search(r"-->\s*(\w+)", line)
            if m:
                names.append(m.group(1))
        elif line.strip():
            rows.append([float(x) for x in line.split()])
    data = np.array(rows, dtype=np.float64).reshape(-1, len(names))
    return {name: data[:, i] for i, name in enumerate(names)}


def run(xml: Union[str, Path], *, driver=None, client_cmd: Optional[Sequence[str]] = None, socket_name: str,
        workdir: Union[str, Path], timeout_s: float = 600.0, tcp_port: Optional[int] = None,
        nodelay: bool = True) -> dict:
    """Run ``i-pi xml`` in ``workdir`` with either ``driver`` served from this process (on the
    UNIX socket ``socket_name``, or on TCP ``localhost:tcp_port``) or the client command
    ``client_cmd`` as a subprocess; returns ``{"client": Client or None,
    "server_log": str, "client_log": str, "wall_s": float}``. Raises UserError (one line, the end
    of the failing side's log) when the server or the client fails or ``timeout_s`` passes. The
    UNIX socket file is removed afterwards."""
    workdir = Path(workdir)
    from .ipi import SOCKET_PREFIX  # here: .ipi imports this module at its end

    sock_path = Path(SOCKET_PREFIX + socket_name)
    if sock_path.exists():
        sock_path.unlink()  # a stale socket from a killed run: i-PI would refuse to start
    env = _subprocess_env()
    server_log, client_log = workdir / "ipi_server.log", workdir / "ipi_client.log"
    t0 = time.perf_counter()
    procs = []
    try:
        with open(server_log, "w") as slog:
            server = subprocess.Popen([ipi_executable(), str(xml)], cwd=workdir, stdout=slog, stderr=subprocess.STDOUT,
                                      env=env)
        procs.append(server)
        client = None
        if driver is not None:
            where = {"unix": socket_name} if tcp_port is None else {"host": "localhost", "port": tcp_port}
            client = _serve(driver, where, xml, server_log, timeout_s=timeout_s, nodelay=nodelay)
        else:
            with open(client_log, "w") as clog:
                procs.append(subprocess.Popen(list(client_cmd), cwd=workdir, stdout=clog, stderr=subprocess.STDOUT,
                                              env=env))
        _wait_for_all(procs, dict(zip(procs, (server_log, client_log))), xml, deadline=t0 + timeout_s,
                      timeout_s=timeout_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if sock_path.exists():
            sock_path.unlink()
    return {"client": client, "server_log": server_log.read_text(),
            "client_log": client_log.read_text() if client_log.exists() else "", "wall_s": time.perf_counter() - t0}


def _subprocess_env() -> dict:
    """The environment of the server and the client: unbuffered output, and this very package first
    on the path (the client subprocess imports it; a checkout need not be the installed one)."""
    package_root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _serve(driver, where: dict, xml, server_log: Path, *, timeout_s: float, nodelay: bool):
    """Connect to the server at ``where`` and serve ``driver`` until the server ends; the Client."""
    from .ipi import Client, connect  # here: .ipi imports this module at its end

    client = Client(driver, connect(**where, wait_s=min(60.0, timeout_s), nodelay=nodelay))
    client.sock.settimeout(timeout_s)
    try:
        client.serve()
    except TimeoutError:
        raise UserError(f"i-PI run {xml}: no message from the server for {timeout_s:g} s "
                        f"(log: {server_log})") from None
    return client


def _wait_for_all(procs: list, logs: dict, xml, *, deadline: float, timeout_s: float) -> None:
    """Wait until every process of ``procs`` (the server first, then the client if any) has ended;
    UserError (the last line of its log, ``error:`` lines first) as soon as one fails, or when
    ``deadline`` passes."""
    server, server_log = procs[0], logs[procs[0]]
    while any(proc.poll() is None for proc in procs):  # both at once: a dead client leaves i-PI waiting
        for proc in procs:
            if proc.poll() not in (None, 0):
                lines = [ln.strip() for ln in logs[proc].read_text().splitlines() if ln.strip()]
                errors = [ln for ln in lines if ln.startswith("error:")]
                who = "i-PI server" if proc is server else "client"
                raise UserError(f"{who} of {xml} exited with {proc.returncode}: "
                                f"{(errors or lines or ['(no output)'])[-1]} (log: {logs[proc]})")
        if time.perf_counter() > deadline:
            raise UserError(f"i-PI run {xml} did not finish within {timeout_s:g} s (logs: {server_log})")
        time.sleep(0.05)
