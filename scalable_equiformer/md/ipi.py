"""i-PI: path-integral and thermostatted MD with the potential, as an i-PI socket client.

`i-PI <https://ipi-code.org>`_ is a Python MD server: it holds the positions and momenta (of every
bead of a ring polymer in path-integral runs) and asks clients over a socket for the energy and
forces of each configuration. This module is such a client for a trained checkpoint:

.. code-block:: bash

    i-pi examples/ipi/nvt.xml &                      # the server; it opens the socket /tmp/ipi_equiformer
    python -m scalable_equiformer.md.ipi --checkpoint runs/x/best.pt \\
        --structure examples/ipi/atat.xyz --unix equiformer

The client speaks i-PI's socket protocol itself (numpy and :mod:`socket`: ``STATUS`` / ``INIT`` /
``POSDATA`` / ``GETFORCE`` / ``EXIT``; bohr and hartree on the wire, converted with i-PI's own
factors, so that the potential i-PI reports in eV is the one :class:`~.potential.Potential`
computed). UNIX sockets (``--unix NAME``: ``/tmp/ipi_NAME``, i-PI's naming) or TCP
(``--host H --port P``) with ``TCP_NODELAY`` set: the protocol's messages are small, and with
Nagle's algorithm on each step waits ~40 ms for an acknowledgement.

i-PI sends only positions (and a cell): the atomic numbers come from ``--structure``, the same
xyz or PDB file the i-PI input initialises from; its atom count is checked at every step.

The model is for isolated molecules. i-PI always has a box; the client computes the molecule on
its own (no periodic images) and refuses, in one line, a box in which a periodic image of some atom
would come within the model's cutoff of another atom (box width <= the molecule's extent + cutoff
along some cell direction): there the periodic system and the isolated molecule differ. A big box
(the examples use 100 Å) is the way to run a molecule in the gas phase. The virial sent back is
zero: constant-pressure (NPT) runs are meaningless for an isolated molecule.

The same driver also runs under i-PI's own Python driver,
``i-pi-py_driver -m custom -P <path of scalable_equiformer/md/ipi_pes.py> -o template=x.xyz,checkpoint=best.pt``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import UserError

#: i-PI's unit factors (``ipi.utils.units``: bohr per Å, hartree per eV). i-PI converts the
#: input's Å and its eV output with these, so the client uses the same ones.
BOHR_PER_ANGSTROM = 1.8897261
HARTREE_PER_EV = 0.036749326
#: forces: eV/Å -> hartree/bohr, the gradient of the energy in the same units (not i-PI's rounded
#: "ev/ang" constant, which would make the forces 1e-8 inconsistent with the energy)
FORCE_TO_ATOMIC = HARTREE_PER_EV / BOHR_PER_ANGSTROM

HDRLEN = 12
SOCKET_PREFIX = "/tmp/ipi_"


def _header(name: str) -> bytes:
    return name.upper().ljust(HDRLEN).encode()


STATUS, INIT, POSDATA, GETFORCE, EXIT = (_header(m) for m in ("STATUS", "INIT", "POSDATA", "GETFORCE", "EXIT"))
READY, HAVEDATA, NEEDINIT, FORCEREADY = (_header(m) for m in ("READY", "HAVEDATA", "NEEDINIT", "FORCEREADY"))


def read_structure(path: Union[str, Path]) -> np.ndarray:
    """The atomic numbers of the structure file ``path`` (xyz, i-PI's xyz with its ``CELL``
    comment, PDB, extxyz: what ASE reads); one-line UserError when it cannot be read."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: structure file not found (give the xyz/PDB file the i-PI input initialises from)")
    try:
        atoms = ase.io.read(str(path), index=0)
    except Exception as exc:  # ASE raises many kinds; one line either way
        raise UserError(f"{path}: cannot read the structure ({type(exc).__name__}: {exc})") from None
    if len(atoms) == 0:
        raise UserError(f"{path}: the structure has no atoms")
    return atoms.numbers.copy()


def check_box(cell: np.ndarray, positions: np.ndarray, cutoff: float, where: str) -> None:
    """Refuse a box too small for the isolated-molecule model (see the module's docstring).

    ``cell``: 3x3 with the cell vectors as columns (i-PI's ``h``), ``positions`` [N, 3], same length
    unit. An all-zero cell means no box."""
    h = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if not np.any(h):
        return
    try:
        inv = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        raise UserError(f"{where}: the i-PI box is singular ({h.T.tolist()}); "
                        "give a large box for a molecule") from None
    frac = positions @ inv.T  # fractional coordinates along each cell vector
    widths = 1.0 / np.linalg.norm(inv, axis=1)  # distance between opposite faces
    extent = (frac.max(axis=0) - frac.min(axis=0)) * widths
    short = np.nonzero(widths <= extent + cutoff)[0]
    if short.size:
        k = int(short[0])
        raise UserError(f"{where}: the model is for isolated molecules, but the i-PI box is {widths[k]:.4g} Å "
                        f"wide along cell vector {k + 1} for a molecule {extent[k]:.4g} Å across and a {cutoff:g} Å "
                        f"cutoff: periodic images would interact; make the box wider than {extent[k] + cutoff:.4g} Å "
                        "(the examples use 100 Å)")


class EquiformerDriver:
    """Energy and forces for i-PI in its units: the interface of i-PI's Python drivers
    (``ipi.pes.dummy.Dummy_driver``: ``driver(cell, pos) -> (pot, force, vir, extras)``).

    Args:
        potential: a :class:`~scalable_equiformer.md.potential.Potential`.
        numbers: the atomic numbers, in i-PI's atom order.
        structure: the name of the file they come from (messages name it).
    """

    def __init__(self, potential, numbers: Sequence[int], structure: str = "the structure"):
        self.potential = potential
        self.structure = str(structure)
        try:
            potential.set_numbers(numbers)
        except UserError as exc:
            raise UserError(f"{self.structure}: {exc}") from None
        self.natoms = potential.num_atoms
        #: seconds spent in Potential.compute, and how many calls (the benchmark reads them)
        self.compute_s = 0.0
        self.first_compute_s = 0.0
        self.calls = 0

    @classmethod
    def from_files(cls, checkpoint: Union[str, Path], structure: Union[str, Path], *, device=None, dtype=None,
                   **kwargs) -> "EquiformerDriver":
        """A driver from a training checkpoint and the structure file of the i-PI input."""
        from .potential import Potential

        numbers = read_structure(structure)
        return cls(Potential.from_checkpoint(checkpoint, device=device, dtype=dtype, **kwargs), numbers, structure)

    def compute_structure(self, cell: np.ndarray, pos: np.ndarray):
        """``(energy hartree, forces [N, 3] hartree/bohr, virial 3x3, extras "")`` at ``pos``
        ([N, 3] bohr) in the box ``cell`` (bohr, vectors as columns)."""
        pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
        if pos.shape[0] != self.natoms:
            raise UserError(f"{self.structure}: has {self.natoms} atoms but i-PI sent {pos.shape[0]}: give the client "
                            "the structure file the i-PI input initialises from")
        pos_a = pos / BOHR_PER_ANGSTROM
        check_box(np.asarray(cell, dtype=np.float64) / BOHR_PER_ANGSTROM, pos_a, self.potential.cutoff,
                  where=self.structure)
        t0 = time.perf_counter()
        energy, forces = self.potential.compute(pos_a)
        seconds = time.perf_counter() - t0
        if self.calls == 0:
            self.first_compute_s = seconds  # the benchmark times from the first reply on: without this call
        self.compute_s += seconds
        self.calls += 1
        return energy * HARTREE_PER_EV, forces * FORCE_TO_ATOMIC, np.zeros((3, 3)), ""

    def __call__(self, cell, pos):
        if isinstance(cell, list):  # i-PI's batched interface
            return [self.compute_structure(c, p) for c, p in zip(cell, pos)]
        return self.compute_structure(cell, pos)


# -- the socket protocol ---------------------------------------------------------------------------


def connect(unix: Optional[str] = None, host: Optional[str] = None, port: Optional[int] = None, *,
            sockets_prefix: str = SOCKET_PREFIX, wait_s: float = 60.0, nodelay: bool = True) -> socket.socket:
    """A socket connected to an i-PI server: ``unix`` names i-PI's UNIX socket
    (``sockets_prefix + unix``), else TCP to ``host:port`` with ``TCP_NODELAY`` (``nodelay=False``
    only to measure what Nagle's algorithm costs). Retries for ``wait_s`` seconds while the server
    is starting."""
    if (unix is None) == (host is None):
        raise UserError("give either a UNIX socket name (--unix NAME) or a TCP address (--host H --port P)")
    if unix is not None:
        address, family, where = sockets_prefix + unix, socket.AF_UNIX, f"UNIX socket {sockets_prefix + unix}"
    else:
        if port is None or not 0 < int(port) < 65536:
            raise UserError(f"--port must be a TCP port number (1-65535), not {port}")
        address, family, where = (host, int(port)), socket.AF_INET, f"TCP {host}:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(bool(nodelay)))
        try:
            sock.connect(address)
            return sock
        except (FileNotFoundError, ConnectionRefusedError, socket.gaierror) as exc:
            sock.close()
            if isinstance(exc, socket.gaierror) or time.monotonic() > deadline:
                raise UserError(f"no i-PI server at {where} after {wait_s:g} s ({exc.strerror or exc}); start "
                                "`i-pi input.xml` with a matching <ffsocket> first") from None
            time.sleep(0.05)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("i-PI closed the socket")
        got += k
    return bytes(buf)


class Client:
    """The client side of i-PI's socket protocol around a driver (``driver(cell, pos)``).

    :meth:`serve` answers the server until it sends ``EXIT`` (or closes the socket). Timing, for
    the benchmark: ``first_request``, ``first_reply``, ``last_reply`` (``time.perf_counter`` at
    the first ``POSDATA``, the first and the last forces sent) and ``requests``."""

    def __init__(self, driver, sock: socket.socket):
        self.driver, self.sock = driver, sock
        self.requests = 0
        self.first_request: Optional[float] = None
        self.first_reply: Optional[float] = None
        self.last_reply: Optional[float] = None

    def timing(self) -> dict:
        """What the client measured: force calls, seconds in the model, milliseconds between two
        replies (one force call of i-PI: the model, the socket and i-PI's own step)."""
        calls = max(1, getattr(self.driver, "calls", self.requests))
        gaps = self.requests - 1
        return {"requests": self.requests, "compute_s": getattr(self.driver, "compute_s", float("nan")),
                "ms_compute_per_call": 1e3 * getattr(self.driver, "compute_s", float("nan")) / calls,
                "ms_between_replies": 1e3 * (self.last_reply - self.first_reply) / gaps if gaps > 0 else float("nan"),
                "neighbour_searches": getattr(getattr(self.driver, "potential", None), "searches", None)}

    def serve(self) -> str:
        """Answer i-PI until it is done; returns why ("exit" or "disconnected")."""
        sock, initialised, result = self.sock, False, None
        try:
            while True:
                try:
                    header = _recv_exact(sock, HDRLEN)
                except ConnectionError:
                    return "disconnected"
                if header == STATUS:
                    sock.sendall(NEEDINIT if not initialised else HAVEDATA if result is not None else READY)
                elif header == INIT:
                    _rid, length = np.frombuffer(_recv_exact(sock, 8), np.int32)
                    text = _recv_exact(sock, int(length)).decode("utf-8", "replace")
                    batch = [t.partition(":")[2].strip() for t in text.split(",")
                             if t.partition(":")[0].strip() == "batch_size"]
                    if batch and batch[0] not in ("", "1"):
                        raise UserError(f"i-PI asks for batches of {batch[0]} structures (<ffsocket> batch_size): this "
                                        "client evaluates one at a time; remove batch_size from the i-PI input")
                    initialised = True
                elif header == POSDATA:
                    if self.first_request is None:
                        self.first_request = time.perf_counter()
                    cell = np.frombuffer(_recv_exact(sock, 72), np.float64).reshape(3, 3)
                    _recv_exact(sock, 72)  # the inverse cell
                    (nat,) = np.frombuffer(_recv_exact(sock, 4), np.int32)
                    pos = np.frombuffer(_recv_exact(sock, 24 * int(nat)), np.float64).reshape(-1, 3)
                    # i-PI sends its h (C order): the cell vectors are the columns
                    result = self.driver(cell.copy(), pos)
                    self.requests += 1
                elif header == GETFORCE:
                    if result is None:
                        raise UserError("i-PI asked for forces before sending positions (a protocol error)")
                    pot, force, vir, extras = result
                    force = np.ascontiguousarray(force, dtype=np.float64)
                    extra = extras.encode("utf-8") if extras else b""
                    sock.sendall(b"".join((FORCEREADY, np.float64(pot).tobytes(), np.int32(force.size // 3).tobytes(),
                                           force.tobytes(), np.ascontiguousarray(vir, np.float64).tobytes(),
                                           np.int32(len(extra)).tobytes(), extra)))
                    self.last_reply = time.perf_counter()
                    if self.first_reply is None:
                        self.first_reply = self.last_reply
                    result = None
                elif header == EXIT:
                    return "exit"
                else:
                    raise UserError(f"i-PI sent an unknown message {header.decode(errors='replace').strip()!r}: "
                                    "is this an i-PI server?")
        finally:
            sock.close()


def serve(driver, unix: Optional[str] = None, host: Optional[str] = None, port: Optional[int] = None, *,
          sockets_prefix: str = SOCKET_PREFIX, wait_s: float = 60.0) -> Client:
    """Connect ``driver`` to an i-PI server and answer it until it is done; returns the client."""
    client = Client(driver, connect(unix, host, port, sockets_prefix=sockets_prefix, wait_s=wait_s))
    client.serve()
    return client


# -- command line ----------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scalable_equiformer.md.ipi",
                                description="Serve a trained checkpoint's energy and forces to an i-PI server.")
    p.add_argument("--checkpoint", required=True, help="best.pt (or a run folder) of a train.py run")
    p.add_argument("--structure", required=True,
                   help="the xyz/PDB file the i-PI input initialises from: the atomic numbers, in i-PI's atom order")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME", help="i-PI's UNIX socket <address> (the socket file is /tmp/ipi_NAME)")
    where.add_argument("--host", help="i-PI's TCP host (with --port)")
    p.add_argument("--port", type=int, default=None, help="i-PI's TCP port (with --host)")
    p.add_argument("--sockets-prefix", default=SOCKET_PREFIX, help=f"UNIX socket prefix (default {SOCKET_PREFIX})")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "float64"], help="default: as trained")
    p.add_argument("--skin", type=float, default=None, help="Verlet skin in Å (default: Potential's)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the server to open its socket")
    p.add_argument("--stats", default=None, help="write the client's timing (requests, seconds in the model) as JSON")
    args = p.parse_args(argv)
    if args.host is not None and args.port is None:
        p.error("--host needs --port")
    try:
        kwargs = {} if args.skin is None else {"skin": args.skin}
        driver = EquiformerDriver.from_files(args.checkpoint, args.structure, device=args.device,
                                             dtype=args.dtype, **kwargs)
        client = serve(driver, unix=args.unix, host=args.host, port=args.port, sockets_prefix=args.sockets_prefix,
                       wait_s=args.wait)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = client.timing()
    print(f"i-PI client: {stats['requests']} force calls, {stats['ms_compute_per_call']:.2f} ms each in the model, "
          f"{stats['ms_between_replies']:.2f} ms between replies, {stats['neighbour_searches']} neighbour searches")
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats, indent=1) + "\n")
    return 0


# the inputs and runs (:mod:`.ipi_run`), importable from here as before
from .ipi_run import (  # noqa: E402, F401
    SHIPPED, input_xml, ipi_executable, read_properties, run, shipped_frame, write_examples, write_structure,
)

if __name__ == "__main__":
    sys.exit(main())
