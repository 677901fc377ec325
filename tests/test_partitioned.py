"""The partitioned Equiformer over 2 and 4 gloo processes equals the single-process model.

Energies, forces and parameter gradients of a training-mode step (forces with create_graph, then
loss.backward) on the shared AT-AT frames (a batch of two molecules, fp64; one frame, fp32) and
on a 1,080-atom system (18 AT-AT copies 1.5 Å apart, cutoff 3 Å, fp64); every edge computed
exactly once; a 3-atom molecule over 4 ranks (a part with no atoms); per-block checkpointing
(memory.checkpointing=blocks) inside the partitioned model; and D=2 x P=2 data
parallelism with the loss scaled by gradient_scale and gradients averaged over the world (as
DeepSpeed does). Tolerances: 1e-9 relative in fp64 (gradients also tensor by tensor), 1e-5 in
fp32 (gradients as one vector; see tools/partition_harness.py for why).
"""

from pathlib import Path

import pytest
import torch

from partition_harness import (
    TOLERANCE,
    build_checked_model,
    compare,
    describe,
    evaluate,
    load_frames,
    stack_frames,
    make_system,
    reference_step,
    run_partitioned,
    tile_system,
    tiny_model_config,
)

ATAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "xtb" / "AT-AT_xtb_500K.npz"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    if not ATAT.exists():
        pytest.skip(f"shared data missing: {ATAT}")
    R, z = stack_frames(load_frames(ATAT, 5))
    m64 = build_checked_model(tiny_model_config(dtype="float64"), seed=0)
    m32 = build_checked_model(tiny_model_config(dtype="float32"), seed=1)
    m64_c3 = build_checked_model(tiny_model_config(dtype="float64", cutoff=3.0), seed=2)
    tiled = tile_system(R[0], z, reps=(3, 3, 2), gap=1.5)  # 1,080 atoms
    systems = {
        "atat_batch2": (m64, make_system("atat_batch2", [(R[0], z), (R[1], z)], eval=True)),
        "three_atoms": (m64, make_system("three_atoms", [(R[2][:3], z[:3])])),
        "atat_fp32": (m32, make_system("atat_fp32", [(R[2], z)])),
        "tiled_1080": (m64_c3, make_system("tiled_1080", [tiled])),
        "atat_checkpointed": (m64, make_system("atat_checkpointed", [(R[2], z)])),
    }
    cases = [
        (m64, [systems["atat_batch2"][1], systems["three_atoms"][1]]),
        (m32, [systems["atat_fp32"][1]]),
        (m64_c3, [systems["tiled_1080"][1]]),
        (m64, [systems["atat_checkpointed"][1]], {"checkpointing": "blocks"}),
    ]
    dp_systems = [make_system("dp0", [(R[3], z)]), make_system("dp1", [(R[4], z)])]
    refs = {}

    def ref(name):
        if name not in refs:
            model, system = systems[name]
            refs[name] = reference_step(model, system)
        return refs[name]

    # one thread, as the workers: on a busy machine OpenMP's spinning threads slow steps 10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"cases": cases, "systems": systems, "ref": ref, "dp": (m64, dp_systems), "runs": {}}
    torch.set_num_threads(threads)


def run(setup, P):
    if P not in setup["runs"]:
        dp = None
        if P == 4:
            model, dp_systems = setup["dp"]
            dp = (model, dp_systems, 2)
        setup["runs"][P] = run_partitioned(setup["cases"], P, data_parallel=dp)
    return setup["runs"][P]


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize(
    "name", ["atat_batch2", "atat_fp32", "tiled_1080", "three_atoms", "atat_checkpointed"]
)
def test_partitioned_equals_single_process(setup, P, name):
    ranks = run(setup, P)
    model, system = setup["systems"][name]
    e = evaluate(setup["ref"](name), ranks, name, TOLERANCE[model.dtype])
    print(describe(name, e, P))
    assert e["edges_once"], "every edge must be computed by exactly one rank"
    assert e["ok"], e
    if model.dtype == torch.float64:  # in fp64 each gradient tensor on its own, too
        assert e["grads_per_tensor"] <= TOLERANCE[torch.float64], e
    if name == "tiled_1080":
        assert e["atoms"] >= 1000
        assert e["edge_imbalance"] < 1.05
    if name == "three_atoms" and P == 4:  # P > atoms: a part with no atoms takes part
        owned = [r[name]["owned"] for r in ranks]
        assert sorted(owned) == [0, 1, 1, 1]


def test_data_parallel_times_partitions(setup):
    """World 4 = D 2 x P 2: with loss x gradient_scale and a world average, the gradients equal
    the mean of the two molecules' single-process gradients; energies, forces per molecule."""
    ranks = run(setup, 4)
    model, (s0, s1) = setup["dp"]
    r0, r1 = reference_step(model, s0), reference_step(model, s1)
    mean = {"energy": r0["energy"], "forces": r0["forces"],
            "grads": {k: 0.5 * (r0["grads"][k] + r1["grads"][k]) for k in r0["grads"]}}
    errs = compare(mean, ranks[0]["data_parallel"])
    print("D=2 x P=2:", errs)
    tol = TOLERANCE[torch.float64]
    assert max(errs["energy"], errs["forces"], errs["grads"], errs["grads_per_tensor"]) <= tol, errs
    for rank, want in ((1, r0), (2, r1), (3, r1)):  # ranks 0, 1 hold molecule 0; 2, 3 molecule 1
        got = ranks[rank]["data_parallel"]
        assert compare(want, {**got, "grads": None})["forces"] <= tol


def test_check_command(tmp_path, capsys):
    """``tools/check_partitions.py`` (in-process main) passes and reports."""
    import json

    from helpers import load_tool

    main = load_tool("check_partitions").main

    if not ATAT.exists():
        pytest.skip(f"shared data missing: {ATAT}")
    out = tmp_path / "report.json"
    code = main(["--data", str(ATAT), "--partitions", "2", "--dtype", "float64", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads(out.read_text())
    assert report["ok"] and report["partitions"] == 2
    (entry,) = report["systems"].values()
    assert entry["edges_once"] and entry["forces"] <= 1e-9
    assert "rel. error energy" in text and "OK" in text
