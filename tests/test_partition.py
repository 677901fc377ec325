"""Unit tests of the spatial partition and its halo maps (no processes)."""

from pathlib import Path

import pytest
import torch

from scalable_equiformer.data import radius_graph
from partition_harness import load_frames, stack_frames, tile_system
from scalable_equiformer.parallel.partition import bisect_atoms, partition_graph

ATAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "xtb" / "AT-AT_xtb_500K.npz"
CUTOFF = 5.0


@pytest.fixture(scope="module")
def atat():
    if not ATAT.exists():
        pytest.skip(f"shared data missing: {ATAT}")
    R, z = stack_frames(load_frames(ATAT, 1))
    return R[0], z


@pytest.fixture(scope="module")
def tiled(atat):
    pos, z = tile_system(*atat, reps=(3, 3, 2), gap=2.0)  # 1,080 atoms
    return pos, z


def check_partition(part, edge_index):
    """Every invariant of a GraphPartition: exact edge cover, halo, send/recv maps."""
    P, N, E = part.num_parts, part.num_nodes, edge_index.shape[1]
    locs = [part.local(p) for p in range(P)]
    # every atom owned once, every edge computed once
    owned = torch.cat([lp.owned for lp in locs])
    assert torch.equal(torch.sort(owned).values, torch.arange(N))
    ids = torch.cat([lp.edge_ids for lp in locs])
    assert torch.equal(torch.sort(ids).values, torch.arange(E))
    for lp in locs:
        nodes = lp.nodes
        assert torch.equal(part.owner[lp.owned], torch.full((lp.num_owned,), lp.part))
        # local edges are the global ones, targets owned
        assert torch.equal(nodes[lp.edge_index], edge_index[:, lp.edge_ids])
        assert bool((lp.edge_index[1] < lp.num_owned).all())
        # halo = senders owned elsewhere, exactly, ordered by (owner, id)
        src = edge_index[0, lp.edge_ids]
        need = torch.unique(src[part.owner[src] != lp.part])
        assert torch.equal(torch.sort(lp.halo).values, need)
        key = part.owner[lp.halo] * N + lp.halo
        assert torch.equal(key, torch.sort(key).values)
        assert sum(lp.recv_counts) == lp.num_halo and lp.recv_counts[lp.part] == 0
        assert sum(lp.send_counts) == lp.send_index.numel()
        assert bool((lp.send_index < lp.num_owned).all())
    # what p sends to q is, in order, q's halo slice owned by p
    for p, lp in enumerate(locs):
        sends = torch.split(lp.owned[lp.send_index], lp.send_counts)
        for q, lq in enumerate(locs):
            assert lp.send_counts[q] == lq.recv_counts[p]
            recv = torch.split(lq.halo, lq.recv_counts)[p]
            assert torch.equal(sends[q], recv)


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_partition_atat(atat, P):
    pos, _ = atat
    ei = radius_graph(pos, CUTOFF)
    part = partition_graph(pos, ei, P)
    check_partition(part, ei)
    s = part.stats()
    print(f"AT-AT P={P}: edges/part {s['edges_per_part']}, max/mean {s['edge_imbalance']:.3f}, "
          f"halo {s['halo_per_part']}")
    assert s["edge_imbalance"] <= (1.25 if P > 1 else 1.0)  # 60 atoms: one atom is ~3 % of a part


@pytest.mark.parametrize("P", [2, 4, 8])
def test_partition_tiled_balance_and_halo(tiled, P):
    pos, _ = tiled
    ei = radius_graph(pos, CUTOFF)
    assert pos.shape[0] >= 1000
    part = partition_graph(pos, ei, P)
    check_partition(part, ei)
    s = part.stats()
    print(f"tiled N={pos.shape[0]} P={P}: edges/part {s['edges_per_part']}, "
          f"max/mean {s['edge_imbalance']:.4f}, halo/part {s['halo_per_part']}")
    assert s["edge_imbalance"] < 1.02
    # a spatial partition's halo is far smaller than a random one's
    rnd = partition_graph(pos, ei, P, owner=torch.randperm(pos.shape[0]) % P)
    assert s["halo_total"] < 0.5 * rnd.stats()["halo_total"]


def test_partition_deterministic(tiled):
    pos, _ = tiled
    ei = radius_graph(pos, CUTOFF)
    a = partition_graph(pos, ei, 4)
    b = partition_graph(pos.clone(), ei.clone(), 4)
    assert torch.equal(a.owner, b.owner)
    assert torch.equal(a.halo_src, b.halo_src) and torch.equal(a.halo_dest, b.halo_dest)


def test_more_parts_than_atoms():
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0.1, 0]], dtype=torch.float64)
    ei = radius_graph(pos, 1.5)
    part = partition_graph(pos, ei, 5)
    check_partition(part, ei)
    assert sorted(part.atoms_per_part().tolist()) == [0, 0, 1, 1, 1]
    empty = [p for p in range(5) if part.local(p).num_owned == 0]
    for p in empty:
        lp = part.local(p)
        assert lp.edge_index.shape == (2, 0) and lp.num_halo == 0 and sum(lp.send_counts) == 0


def test_given_owner_with_empty_part(atat):
    pos, _ = atat
    ei = radius_graph(pos, CUTOFF)
    owner = (pos[:, 0] > pos[:, 0].median()).long() * 2  # parts 0 and 2; part 1 empty
    part = partition_graph(pos, ei, 3, owner=owner)
    check_partition(part, ei)
    assert part.atoms_per_part()[1] == 0


def test_batch_partitioned_per_molecule(atat):
    pos, _ = atat
    pos2 = pos @ torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]  # overlapping copy
    allpos = torch.cat([pos, pos2 + 0.5])
    batch = torch.arange(2).repeat_interleave(pos.shape[0])
    ei = radius_graph(allpos, CUTOFF, batch=batch)
    part = partition_graph(allpos, ei, 4, batch=batch)
    check_partition(part, ei)
    for b in range(2):  # each molecule is cut into all 4 parts
        assert set(part.owner[batch == b].tolist()) == {0, 1, 2, 3}
    # the same as partitioning each molecule alone
    solo = bisect_atoms(pos, torch.bincount(radius_graph(pos, CUTOFF)[1], minlength=60), 4)
    assert torch.equal(part.owner[:60], solo)


def test_isolated_atoms_balanced_by_count():
    pos = torch.arange(10, dtype=torch.float64)[:, None] * torch.tensor([[10.0, 0, 0]])
    ei = radius_graph(pos, 1.0)
    assert ei.shape[1] == 0
    part = partition_graph(pos, ei, 3)
    check_partition(part, ei)
    assert sorted(part.atoms_per_part().tolist()) == [3, 3, 4]


def test_make_groups_rejects_indivisible_world():
    from scalable_equiformer.parallel import make_groups

    with pytest.raises(ValueError, match="graph_partitions"):
        make_groups(4, 3)


def test_partition_layout_keeps_a_molecule_on_one_node(monkeypatch):
    """check_layout: P must divide the world and, on more than one node, the ranks per node; the
    groups of make_groups (ranks d*P .. d*P+P-1) then never straddle two nodes of consecutive ranks."""
    from scalable_equiformer.errors import ConfigError
    from scalable_equiformer.parallel.partitioned import check_layout
    from scalable_equiformer.runtime import launch_env

    for world, P, local in ((4, 2, 2), (8, 4, 4), (8, 2, 4), (4, 2, 4), (6, 3, 6), (8, 8, 8)):
        check_layout(world, P, local)
        for d in range(world // P):  # node of a rank = rank // local under torchrun / DeepSpeed
            assert len({r // local for r in range(d * P, d * P + P)}) == 1, (world, P, local, d)
    check_layout(4, 4, None)  # no ranks-per-node figure: one node
    check_layout(6, 3, 6)  # one node: any divisor of the world
    with pytest.raises(ConfigError, match=r"graph_partitions=4 must divide the ranks per node \(2, LOCAL_WORLD_SIZE\)"):
        check_layout(4, 4, 2)  # 2 nodes x 2 ranks: a molecule's 4 partitions would span both nodes
    with pytest.raises(ConfigError, match=r"graph_partitions=4 must divide the ranks per node \(6"):
        check_layout(12, 4, 6)
    with pytest.raises(ConfigError, match="must divide the number of ranks"):
        check_layout(4, 3, 2)
    # the ranks per node as the launchers tell them
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun
    assert launch_env().local_world_size == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # DeepSpeed's launcher
    assert launch_env().local_world_size == 2
    monkeypatch.delenv("LOCAL_SIZE")
    assert launch_env().local_world_size == 4  # neither: one node


def test_one_part_without_distributed_is_the_model(atat):
    """P = 1 (no process group at all): PartitionedModel is the plain model, train and eval."""
    from scalable_equiformer.parallel import PartitionedModel
    from partition_harness import (
        build_checked_model,
        compare,
        make_system,
        partitioned_step,
        reference_step,
        tiny_model_config,
    )

    model = build_checked_model(tiny_model_config(dtype="float64", num_blocks=1))
    system = make_system("one", [atat], eval=True)
    ref = reference_step(model, system)
    got = partitioned_step(PartitionedModel(model), system)
    errs = compare(ref, got)
    assert max(errs["energy"], errs["forces"], errs["grads_per_tensor"]) <= 1e-12, errs
    assert compare(ref["eval"], {**got["eval"], "grads": None})["forces"] <= 1e-12
    assert not got["eval"]["requires_grad"]
