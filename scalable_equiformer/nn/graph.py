"""Radius graph (neighbour search), the model's first stage (``Equiformer.build_graph``); ``data`` re-exports
:func:`radius_graph`. Batching for training: :mod:`..training.batches`.

Edge convention (PyG ``flow='source_to_target'``): ``edge_index[0]`` is the source (sender) atom j,
``edge_index[1]`` the target (receiver) atom i; messages flow j -> i. An edge j -> i exists iff
j != i, both are in the same graph of the batch and

    sqrt(sum((pos[j] - pos[i]) ** 2)) < r        (strict; computed in pos's dtype, float32 at least)

The graph is symmetric (j -> i iff i -> j). Edges are sorted by target, then source, so the output
does not depend on the backend. Positions in Å, r in Å.

Backends: ``torch_cluster.radius_graph`` when importable (called with a slightly larger radius and a
neighbour limit of all atoms, since its default of 32 silently drops edges; the result is then
filtered with the exact rule above), else an exact pure-torch cell list: atoms are binned per graph
into cubic cells slightly larger than r and compared with the atoms of the 27 surrounding cells, in
chunks of at most ``_PAIR_BUDGET`` candidate pairs, so memory stays bounded for any number of atoms
(20 000 atoms at liquid density, r = 5 Å: about 1-2 s on one CPU core). Distances are exact
differences, never ``torch.cdist``'s matmul expansion, which misclassifies pairs near r.
Everything runs under ``torch.no_grad`` on pos's device: the model recomputes edge vectors with
gradients from ``pos[edge_index]``.
"""

from __future__ import annotations

import torch

try:  # optional extra: pip install scalable_equiformer[cluster]
    import torch_cluster as _torch_cluster  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _torch_cluster = None

#: candidate pairs evaluated at once by the fallback (3 * 8 bytes each in float64: ~100 MB).
_PAIR_BUDGET = 1 << 22


def _distance_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _exact_dist(pos: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    diff = pos[src] - pos[dst]
    return (diff * diff).sum(-1).sqrt()


def _sort_edges(src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    key = dst * n + src
    order = torch.argsort(key)
    return torch.stack([src[order], dst[order]])


def _fallback(pos: torch.Tensor, r: float, batch: torch.Tensor):
    """Exact cell-list search; returns (src, dst, dist) in the original atom indexing (unsorted).

    Atoms are binned into cubic cells of edge s slightly above r (per graph), so every pair closer
    than r lies in the same or an adjacent cell; each atom is compared with the atoms of its 27
    neighbouring cells (9 contiguous runs of cell ids), in chunks of at most _PAIR_BUDGET pairs.
    """
    ddtype = _distance_dtype(pos.dtype)
    order, first, counts = _neighbour_cell_runs(pos, r, batch, ddtype)
    recv_of_run = torch.arange(pos.shape[0], device=pos.device).repeat_interleave(9)
    pos_s = pos[order].to(ddtype)
    srcs, dsts, dists = [], [], []
    for a, b in _chunk_bounds(counts):
        cnt = counts[a:b]
        m = int(cnt.sum())
        if m == 0:
            continue
        recv = torch.repeat_interleave(recv_of_run[a:b], cnt)
        start = torch.cumsum(cnt, 0) - cnt
        send = torch.repeat_interleave(first[a:b] - start, cnt) + torch.arange(m, device=pos.device)
        d = _exact_dist(pos_s, send, recv)
        keep = (d < r) & (send != recv)  # runs never leave a graph (padded cell ids)
        srcs.append(order[send[keep]])
        dsts.append(order[recv[keep]])
        dists.append(d[keep])
    if not srcs:
        empty = torch.empty(0, dtype=torch.long, device=pos.device)
        return empty, empty, torch.empty(0, dtype=ddtype, device=pos.device)
    return torch.cat(srcs), torch.cat(dsts), torch.cat(dists)


def _cell_grid(p64: torch.Tensor, r: float, ddtype: torch.dtype, n_graphs: int):
    """(cell edge s, cells per axis, padded cells per axis D, lowest corner): s slightly above r,
    doubled until every (graph, cell) id fits in an int64."""
    # the margin covers rounding of the cell coordinates and of the exact check in pos's dtype
    s = r * (1.0 + max(64.0 * torch.finfo(ddtype).eps, 1e-6))
    lo_xyz = p64.min(0).values
    ext = p64.max(0).values - lo_xyz
    while True:
        dims = (ext / s).floor().long() + 1
        D = dims + 2  # one empty cell of padding on each side: neighbour offsets never wrap
        if float(n_graphs) * float(D.prod()) < 2.0**62:
            return s, dims, D, lo_xyz
        s *= 2.0


def _neighbour_cell_runs(pos: torch.Tensor, r: float, batch: torch.Tensor, ddtype: torch.dtype):
    """Atoms sorted by cell id, and for each (receiver in sorted order, one of its 9 runs of three
    neighbouring cells): the sorted index where the run's atoms start and how many there are.
    Returns (order, first [n * 9], counts [n * 9])."""
    p64 = pos.to(torch.float64)
    s, dims, D, lo_xyz = _cell_grid(p64, r, ddtype, int(batch.max()) + 1)
    c = ((p64 - lo_xyz) / s).floor().long()
    c = torch.minimum(c.clamp(min=0), dims - 1) + 1
    D0, D1, D2 = (int(v) for v in D)
    cell = ((batch * D0 + c[:, 0]) * D1 + c[:, 1]) * D2 + c[:, 2]
    order = torch.argsort(cell)
    cs, cx = cell[order], c[order]
    bs = batch[order]
    off = torch.tensor([-1, 0, 1], device=pos.device)
    dx = off.repeat_interleave(3)  # 9 (dx, dy) offsets
    dy = off.repeat(3)
    mid = ((bs[:, None] * D0 + cx[:, 0:1] + dx) * D1 + cx[:, 1:2] + dy) * D2 + cx[:, 2:3]  # [n, 9]
    first = torch.searchsorted(cs, (mid - 1).reshape(-1), side="left")
    last = torch.searchsorted(cs, (mid + 1).reshape(-1), side="right")
    return order, first, last - first  # candidates per (receiver, run), receivers in sorted order


def _chunk_bounds(counts: torch.Tensor) -> list:
    """(start, end) of consecutive runs holding at most _PAIR_BUDGET candidate pairs each (a single
    run may exceed it)."""
    csum = torch.cumsum(counts, 0)
    n_runs = counts.numel()
    bounds = [0]
    while bounds[-1] < n_runs:
        done = int(csum[bounds[-1] - 1]) if bounds[-1] > 0 else 0
        nxt = int(torch.searchsorted(csum, torch.tensor(done + _PAIR_BUDGET, device=counts.device), side="right"))
        bounds.append(max(nxt, bounds[-1] + 1))
    return list(zip(bounds[:-1], bounds[1:]))


def _with_torch_cluster(pos: torch.Tensor, r: float, batch: torch.Tensor):
    n = pos.shape[0]
    # slightly larger radius so that no pair with exact distance < r is lost to rounding
    r_big = r * (1.0 + 1e-4) + 1e-8
    ei = _torch_cluster.radius_graph(
        pos, r_big, batch=batch, loop=False, max_num_neighbors=max(n, 1), flow="source_to_target"
    )
    src, dst = ei[0].long(), ei[1].long()
    pos_d = pos.to(_distance_dtype(pos.dtype))
    d = _exact_dist(pos_d, src, dst)
    keep = (d < r) & (src != dst) & (batch[src] == batch[dst])
    return src[keep], dst[keep], d[keep]


def radius_graph(
    pos: torch.Tensor,
    r: float,
    batch: torch.Tensor | None = None,
) -> torch.Tensor:
    """All pairs closer than ``r`` within each graph; see the module docstring for the exact rule.

    Args:
        pos: [n, 3] positions (Å), any float dtype, any device. Not differentiated through.
        r: cutoff radius (Å); pairs with distance strictly below r are edges.
        batch: [n] graph index of each atom (need not be sorted); None = one graph.

    Returns:
        edge_index [2, E] long on pos's device: row 0 = source j, row 1 = target i, sorted by
        target then source; no self loops.
    """
    if pos.dim() != 2 or pos.shape[-1] != 3:
        raise ValueError(f"radius_graph: pos must be [n, 3], got {tuple(pos.shape)}")
    r = float(r)
    if not r > 0:
        raise ValueError(f"radius_graph: r must be > 0, got {r}")
    n = pos.shape[0]
    with torch.no_grad():
        pos = pos.detach()
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=pos.device)
        else:
            batch = batch.to(device=pos.device, dtype=torch.long)
            if batch.shape != (n,):
                raise ValueError(f"radius_graph: batch must be [{n}], got {tuple(batch.shape)}")
        if n == 0:
            return torch.empty(2, 0, dtype=torch.long, device=pos.device)
        if not bool(torch.isfinite(pos).all()):
            raise ValueError("radius_graph: pos contains NaN or inf")
        if bool((batch < 0).any()):
            raise ValueError("radius_graph: batch indices must be >= 0")
        sorted_batch = bool((batch[1:] >= batch[:-1]).all()) if n > 1 else True
        if _torch_cluster is not None and sorted_batch:
            src, dst, _ = _with_torch_cluster(pos, r, batch)
        else:
            src, dst, _ = _fallback(pos, r, batch)
        return _sort_edges(src, dst, n)


__all__ = ["radius_graph"]
