"""memory.checkpointing=forces inside the graph-partitioned model equals the plain single process.

The force-aware recomputation (``memory/force_checkpoint.py``: stage inputs kept, block-by-block VJPs
recomputed with create_graph inside ``loss.backward()``) runs over P gloo processes with stages
that start with a halo exchange. In float64, P = 2 and P = 3: energies, forces and parameter
gradients (summed over the group) of a training step (forces with create_graph, loss = energy +
force term, backward) and inference equal the single-process plain autograd model to 1e-10
relative, on every rank. P = 3 includes a part with no atoms and a part with no edges (every
rank must still join every collective, or the group deadlocks). With dropout on, the masks are
those of the plain partitioned path (same random stream per rank). ``memory.edge_chunk_size``
with P > 1 is a ConfigError; with P = 1 (no process group) it chunks and stays exact.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from scalable_equiformer.errors import ConfigError
from scalable_equiformer.memory import ForceRunner, Levers
from scalable_equiformer.memory.force_checkpoint import edge_chunks
import partition_harness as C
from scalable_equiformer.parallel.launch import spawn_local
from scalable_equiformer.parallel.partitioned import PartitionedModel

ATAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "xtb" / "AT-AT_xtb_500K.npz"
TOL = 1e-10

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a deadlock fails, not hangs


def _worker(rank: int, world: int, workdir: str) -> None:
    """One rank: the forces strategy on every system; the dropout pair; the chunk refusal."""
    job = torch.load(Path(workdir) / "job.pt", weights_only=False)
    out = {}
    model = C._build(job["model_config"], job["state_dict"])
    pmodel = PartitionedModel(model, runner=ForceRunner(Levers("forces")))
    assert pmodel.runner.levers.checkpointing == "forces"
    for system in job["systems"]:
        out[system["name"]] = C.partitioned_step(pmodel, system)
    # memory.keep_blocks: the last block keeps its graph, with halo exchanges in it
    out["keep1"] = C.partitioned_step(PartitionedModel(model, runner=ForceRunner(Levers("forces", keep_blocks=1))),
                                      job["systems"][0])
    if job["dropout"] is not None:  # same seed per rank: forces path vs plain partitioned path
        cfg, state, system = job["dropout"]
        model = C._build(cfg, state)
        runs = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "dropout is on: masks per rank"
            for key, strategy, seed in (("forces", "forces", 7), ("autograd", "none", 7), ("other_seed", "none", 8)):
                torch.manual_seed(seed + 100 * rank)
                runs[key] = C.partitioned_step(PartitionedModel(model, runner=ForceRunner(Levers(strategy))), system)
        out["dropout"] = runs
    try:
        PartitionedModel(model, runner=ForceRunner(Levers("forces", edge_chunk_size=64)))
        out["chunk_error"] = None
    except ConfigError as e:
        out["chunk_error"] = str(e)
    torch.save(out, Path(workdir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def setup():
    if not ATAT.exists():
        pytest.skip(f"shared data missing: {ATAT}")
    R, z = C.stack_frames(C.load_frames(ATAT, 3))
    model = C.build_checked_model(C.tiny_model_config(dtype="float64"), seed=0)  # plain: the oracle
    far = torch.cat([R[2][:2], R[2][:1] + torch.tensor([[30.0, 0.0, 0.0]], dtype=torch.float64)])
    systems = {
        "atat_batch2": C.make_system("atat_batch2", [(R[0], z), (R[1], z)], eval=True),
        "two_atoms": C.make_system("two_atoms", [(R[2][:2], z[:2])], eval=True),  # P=3: an empty part
        "isolated_atom": C.make_system("isolated_atom", [(far, z[:3])], eval=True),  # a part without edges
    }
    drop_model = C.build_checked_model(
        C.tiny_model_config(dtype="float64", drop_path=0.3, alpha_drop=0.2, proj_drop=0.2), seed=3
    )
    dropout = (dataclasses.asdict(C._model_config_of(drop_model)), drop_model.state_dict(),
               C.make_system("atat_dropout", [(R[2], z)]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"model": model, "systems": systems, "dropout": dropout, "runs": {}, "refs": {}}
    torch.set_num_threads(threads)


def _ranks(setup, P):
    if P not in setup["runs"]:
        model = setup["model"]
        job = {"model_config": dataclasses.asdict(C._model_config_of(model)), "state_dict": model.state_dict(),
               "systems": list(setup["systems"].values()), "dropout": setup["dropout"] if P == 2 else None}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(job, Path(tmp) / "job.pt")
            spawn_local(_worker, P, args=(tmp,), workdir=tmp)
            setup["runs"][P] = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(P)]
    return setup["runs"][P]


def _ref(setup, name):
    if name not in setup["refs"]:
        setup["refs"][name] = C.reference_step(setup["model"], setup["systems"][name])
    return setup["refs"][name]


def _assert_each_gradient(ref, got):
    """Tensor by tensor: 1e-9 relative, above a floor of 1e-14 of the largest gradient (a
    softmax over one edge has gradients that are zero analytically, ~1e-17 in either run)."""
    floor = 1e-14 * max(float(g.abs().max()) for g in ref.values() if g.numel())
    for name, g in ref.items():
        if g.numel():
            err = float((got[name] - g).abs().max())
            assert err <= 1e-9 * float(g.abs().max()) + floor, (name, err)


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("name", ["atat_batch2", "two_atoms", "isolated_atom"])
def test_forces_strategy_partitioned_equals_single_process(setup, P, name):
    ranks = _ranks(setup, P)
    e = C.evaluate(_ref(setup, name), ranks, name, TOL)  # every rank, training and inference
    print(C.describe(name, e, P))
    assert e["ok"], e
    _assert_each_gradient(_ref(setup, name)["grads"], ranks[0][name]["grads"])
    if P == 3 and name == "two_atoms":
        assert sorted(r[name]["owned"] for r in ranks) == [0, 1, 1]  # an empty part took part
    if P == 3 and name == "isolated_atom":
        assert sorted(r[name]["edges"] for r in ranks)[0] == 0 and min(r[name]["owned"] for r in ranks) == 1


def test_forces_strategy_partitioned_with_a_kept_block_equals_single_process(setup):
    name = "atat_batch2"
    ranks = [{name: r["keep1"]} for r in _ranks(setup, 2)]
    e = C.evaluate(_ref(setup, name), ranks, name, TOL)
    assert e["ok"], e
    _assert_each_gradient(_ref(setup, name)["grads"], ranks[0][name]["grads"])


def test_forces_strategy_partitioned_dropout_draws_the_plain_masks(setup):
    """Recomputations restore each stage's random state: with dropout and drop-path on, the
    forces path gives the plain partitioned step of the same per-rank seed."""
    runs = _ranks(setup, 2)[0]["dropout"]
    assert C.compare(runs["autograd"], {**runs["other_seed"], "grads": None})["forces"] > 1e-6  # dropout is live
    errs = C.compare(runs["autograd"], runs["forces"])
    assert max(errs["energy"], errs["forces"], errs["grads"]) <= TOL, errs


def test_edge_chunks_with_partitions_is_a_config_error(setup):
    for r in _ranks(setup, 2):
        assert r["chunk_error"] is not None and "edge_chunk_size" in r["chunk_error"]


def test_forces_strategy_one_part_with_edge_chunks(setup):
    """P = 1 (no process group): the partitioned path, edge chunks included, is exact."""
    model, system = setup["model"], setup["systems"]["atat_batch2"]
    ref = _ref(setup, "atat_batch2")
    twin = C.build_checked_model(C._model_config_of(model))
    twin.load_state_dict(model.state_dict())
    pos = system["pos"]
    assert len(edge_chunks(twin.build_graph(pos, system["batch"]), pos.shape[0], 300)) > 3
    got = C.partitioned_step(PartitionedModel(twin, runner=ForceRunner(Levers("forces", edge_chunk_size=300))), system)
    errs = C.compare(ref, got)
    assert max(errs["energy"], errs["forces"], errs["grads"]) <= TOL, errs
    ev = C.compare(ref["eval"], {**got["eval"], "grads": None})
    assert max(ev["energy"], ev["forces"]) <= TOL and not got["eval"]["requires_grad"], ev
