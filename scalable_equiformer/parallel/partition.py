"""Spatial partition of a molecular graph into P parts, and the halo maps between the parts.

A part *owns* a set of atoms and computes every edge whose receiving atom (``edge_index[1]``) it
owns, so each edge is computed by exactly one part. The senders of those edges that are owned by
another part form the part's *halo*: their node features are received from their owners before
each block (:mod:`scalable_equiformer.parallel.halo`).

Partition: deterministic recursive coordinate bisection. A set of atoms meant for ``k`` parts is
cut across its principal axis (largest variance) so that the two sides carry incoming-edge counts
in the ratio ``floor(k/2) : ceil(k/2)``, and each side is cut again. Ties along the axis are
broken by atom index, the eigenvector's sign is fixed, and the work is done in float64 numpy on
the CPU, so every rank that calls it with the same positions gets the same answer. A set with
fewer atoms than parts gets one atom per part along the axis; the remaining parts are empty.

A batch of several molecules is partitioned molecule by molecule: each molecule is cut into P
parts, and part ``p`` owns the union of the molecules' ``p``-th pieces. Every rank then works on
every molecule, balance holds per molecule, and no halo crosses molecules (the graph has no edges
between molecules anyway).

Local numbering of a part (:class:`LocalPart`): owned atoms first (ascending global index), then
the halo ordered by (owner part, global index). The send list to part ``q`` is ordered by global
index, so an ``all_to_all`` of the concatenated sends lands exactly in the receiver's halo order.

Shapes: ``pos [N, 3]``, ``edge_index [2, E]`` (row 0 = source j, row 1 = target i, messages flow
j -> i), ``owner [N]`` (part of each atom).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "LocalPart",
    "GraphPartition",
    "bisect_atoms",
    "partition_graph",
]


def _principal_axis(p: np.ndarray) -> np.ndarray:
    """Unit vector along the largest-variance direction of points ``p [n, 3]``, sign fixed."""
    if p.shape[0] < 2:
        return np.array([1.0, 0.0, 0.0])
    c = p - p.mean(axis=0)
    cov = c.T @ c  # [3, 3]
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    v = vecs[:, -1]
    k = int(np.argmax(np.abs(v)))
    return v if v[k] >= 0 else -v


def _rcb(
    pos: np.ndarray,
    weight: np.ndarray,
    idx: np.ndarray,
    first_part: int,
    num_parts: int,
    owner: np.ndarray,
) -> None:
    """Assign atoms ``idx`` to parts ``first_part .. first_part + num_parts - 1`` (in place)."""
    n = idx.shape[0]
    if n == 0:
        return
    if num_parts == 1:
        owner[idx] = first_part
        return
    axis = _principal_axis(pos[idx])
    proj = pos[idx] @ axis
    order = np.lexsort((idx, proj))  # by projection, ties by global index
    idx = idx[order]
    if n <= num_parts:
        owner[idx] = first_part + np.arange(n)
        return
    left = num_parts // 2
    right = num_parts - left
    w = weight[idx]
    total = float(w.sum())
    if total <= 0.0:  # isolated atoms: balance by count
        w = np.ones_like(w)
        total = float(n)
    cum = np.concatenate([[0.0], np.cumsum(w)])  # cum[k] = weight of the first k atoms
    target = total * left / num_parts
    lo, hi = left, n - right  # each side keeps at least one atom per part
    k = int(np.clip(np.searchsorted(cum, target), lo, hi))
    if k > lo and abs(cum[k - 1] - target) <= abs(cum[k] - target):
        k -= 1
    _rcb(pos, weight, idx[:k], first_part, left, owner)
    _rcb(pos, weight, idx[k:], first_part + left, right, owner)


def bisect_atoms(
    pos: torch.Tensor | np.ndarray,
    weight: torch.Tensor | np.ndarray,
    num_parts: int,
    batch: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Owner part of each atom: recursive coordinate bisection balanced by ``weight``.

    ``pos [N, 3]``, ``weight [N]`` (e.g. the incoming-edge count), ``batch [N]`` (molecule of
    each atom, sorted as torch-geometric makes it, or None for one molecule). Returns
    ``owner [N]`` int64 in ``0 .. num_parts - 1``.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    p = _as_numpy(pos).astype(np.float64, copy=False)
    w = _as_numpy(weight).astype(np.float64, copy=False)
    n = p.shape[0]
    owner = np.zeros(n, dtype=np.int64)
    if batch is None:
        _rcb(p, w, np.arange(n), 0, num_parts, owner)
    else:
        b = _as_numpy(batch).astype(np.int64, copy=False)
        order = np.argsort(b, kind="stable")
        bounds = np.flatnonzero(np.diff(b[order])) + 1
        for mol in np.split(order, bounds):
            if mol.size:
                _rcb(p, w, np.sort(mol), 0, num_parts, owner)
    return torch.from_numpy(owner)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class LocalPart:
    """What one part (rank) needs: its atoms, its edges and its halo maps.

    All index tensors are int64. Local node numbering: ``nodes = cat(owned, halo)``.

    - ``owned [n_owned]``: global ids of the owned atoms, ascending.
    - ``halo [n_halo]``: global ids of the halo atoms, ordered by (owner part, global id).
    - ``edge_ids [E_p]``: global ids of the edges this part computes (targets owned), in the
      order of the global edge list.
    - ``edge_index [2, E_p]``: those edges in local numbering (targets < n_owned).
    - ``send_index [sum(send_counts)]``: local ids (< n_owned) of the owned atoms to send,
      grouped by destination part in ascending order.
    - ``send_counts[q]`` / ``recv_counts[q]``: rows sent to / received from part ``q``
      (``recv_counts`` concatenated in part order is the halo).
    """

    part: int
    num_parts: int
    owned: torch.Tensor
    halo: torch.Tensor
    edge_ids: torch.Tensor
    edge_index: torch.Tensor
    send_index: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]

    @property
    def num_owned(self) -> int:
        return int(self.owned.numel())

    @property
    def num_halo(self) -> int:
        return int(self.halo.numel())

    @property
    def num_local(self) -> int:
        return self.num_owned + self.num_halo

    @property
    def nodes(self) -> torch.Tensor:
        """Global id of each local node ``[n_owned + n_halo]``."""
        return torch.cat([self.owned, self.halo])

    def to(self, device) -> "LocalPart":
        t = lambda x: x.to(device)  # noqa: E731
        return LocalPart(
            self.part, self.num_parts, t(self.owned), t(self.halo), t(self.edge_ids),
            t(self.edge_index), t(self.send_index), list(self.send_counts),
            list(self.recv_counts),
        )


@dataclass
class GraphPartition:
    """A partition of a graph into ``num_parts`` parts, with the global halo pairs.

    ``owner [N]``; ``halo_dest``, ``halo_src`` (aligned, sorted by (dest, owner of src, src)):
    atom ``halo_src[k]`` is in the halo of part ``halo_dest[k]``.
    """

    num_parts: int
    num_nodes: int
    edge_index: torch.Tensor  # [2, E], global
    owner: torch.Tensor  # [N]
    halo_dest: torch.Tensor  # [H]
    halo_src: torch.Tensor  # [H]
    _locals: dict = field(default_factory=dict, repr=False)

    def local(self, part: int) -> LocalPart:
        """The :class:`LocalPart` of ``part`` (computed once, cached)."""
        if not 0 <= part < self.num_parts:
            raise ValueError(f"part {part} out of range for {self.num_parts} parts")
        if part not in self._locals:
            self._locals[part] = self._build_local(part)
        return self._locals[part]

    def _build_local(self, part: int) -> LocalPart:
        P, N = self.num_parts, self.num_nodes
        owner, ei = self.owner, self.edge_index
        owned = torch.nonzero(owner == part).flatten()
        hmask = self.halo_dest == part
        halo = self.halo_src[hmask]
        recv_counts = torch.bincount(owner[halo], minlength=P).tolist()
        smask = owner[self.halo_src] == part
        send_global = self.halo_src[smask]  # sorted by (dest, src)
        send_counts = torch.bincount(self.halo_dest[smask], minlength=P).tolist()
        g2l = torch.full((N,), -1, dtype=torch.long)
        g2l[owned] = torch.arange(owned.numel())
        g2l[halo] = torch.arange(owned.numel(), owned.numel() + halo.numel())
        edge_ids = torch.nonzero(owner[ei[1]] == part).flatten()
        edge_index = g2l[ei[:, edge_ids]]
        send_index = g2l[send_global]
        return LocalPart(
            part, P, owned, halo, edge_ids, edge_index, send_index, send_counts, recv_counts
        )

    # --- statistics ---------------------------------------------------------------------------
    def edges_per_part(self) -> torch.Tensor:
        """Edges computed by each part ``[P]`` (incoming edges of its owned atoms)."""
        return torch.bincount(self.owner[self.edge_index[1]], minlength=self.num_parts)

    def atoms_per_part(self) -> torch.Tensor:
        return torch.bincount(self.owner, minlength=self.num_parts)

    def halo_per_part(self) -> torch.Tensor:
        """Halo atoms received by each part ``[P]``."""
        return torch.bincount(self.halo_dest, minlength=self.num_parts)

    def stats(self) -> dict:
        """Balance and halo size: ``edge_imbalance`` = max / mean edges per part."""
        e = self.edges_per_part().double()
        mean = float(e.mean()) if self.num_parts else 0.0
        return {
            "num_parts": self.num_parts,
            "num_atoms": self.num_nodes,
            "num_edges": int(self.edge_index.shape[1]),
            "atoms_per_part": self.atoms_per_part().tolist(),
            "edges_per_part": self.edges_per_part().tolist(),
            "halo_per_part": self.halo_per_part().tolist(),
            "edge_imbalance": float(e.max()) / mean if mean > 0 else 1.0,
            "halo_total": int(self.halo_src.numel()),
        }


def partition_graph(
    pos: torch.Tensor,
    edge_index: torch.Tensor,
    num_parts: int,
    batch: torch.Tensor | None = None,
    owner: torch.Tensor | None = None,
) -> GraphPartition:
    """Partition the graph ``(pos [N, 3], edge_index [2, E])`` into ``num_parts`` parts.

    Balanced by incoming-edge count (see the module docstring); ``batch [N]`` partitions each
    molecule separately. Pass ``owner [N]`` to use a given assignment instead (tests, or a
    partition computed once and broadcast). Index work is done on the CPU; move a
    :class:`LocalPart` to the device with ``.to(device)``.
    """
    N = int(pos.shape[0])
    ei = edge_index.detach().to("cpu", torch.long)
    if owner is None:
        indeg = torch.bincount(ei[1], minlength=N)
        owner = bisect_atoms(pos, indeg, num_parts, batch)
    else:
        owner = owner.detach().to("cpu", torch.long)
        if owner.shape != (N,) or (N and (owner.min() < 0 or owner.max() >= num_parts)):
            raise ValueError("owner must be [N] with values in 0 .. num_parts - 1")
    src, dst = ei[0], ei[1]
    cross = owner[src] != owner[dst]
    P = num_parts
    # one key per (destination part, owner of sender, sender); unique sorts and deduplicates
    key = (owner[dst[cross]] * P + owner[src[cross]]) * N + src[cross]
    key = torch.unique(key)
    halo_src = key % N
    halo_dest = key // (N * P)
    return GraphPartition(P, N, ei, owner, halo_dest, halo_src)
