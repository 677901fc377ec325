"""The shipped configs' real models, as users run them (issue 23).

Every other multi-rank test trains the tiny model, whose ZeRO bucket is the 2**20 floor and whose
sizes hide what the paper's 3.5 M-parameter model meets (an odd parameter count broke ZeRO-1/2
set-up, ``memory.micro_batch_size: 4`` of md22_atat.yaml broke every launch on 4 ranks). Here:

* every config in ``configs/`` loads, builds its model, and computes energies and forces; its
  DeepSpeed config and batch plan are valid at the world sizes people launch (1-8 ranks, with and
  without graph partitions);
* ``deepspeed --num_gpus 2 train.py --config md22_atat.yaml`` trains 2 optimizer steps with ZeRO
  stages 1, 2 and 3 and with ``parallel.graph_partitions=2`` on the shipped AT-AT frames
  (micro-batches of 1); the four runs see the same two molecules per step, so their loss
  trajectories agree (fp32, 1e-4 relative); ``torchrun --nproc_per_node 2 train.py --config
  md17_aspirin`` trains 2 steps on the shipped aspirin frames;
* the README's other commands on a paper-size config: ``tools/evaluate.py`` on a ZeRO run's
  best.pt (equal to the run's own test metrics), ``tools/memory_profile.py`` measuring the
  md22_atat model, ``tools/reproduce.py md22 --systems atat``;
* the memory levers at the paper model's size (fp64, aspirin): block checkpointing, force-aware
  checkpointing with edge chunks and kept blocks equal the plain path; bf16 within its tolerance.

Each launch of the paper model takes ~40 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train_common import PY, REPO, launch, read_metrics, results, sets

pytestmark = pytest.mark.slow

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
PAPER_PARAMS = 3_496_001  # the paper's MD17 model (Lmax 2): md17_*.yaml (not _l3) and md22_atat.yaml
DATA = REPO / "scalable_equiformer" / "demo_data"
ATAT = DATA / "AT-AT_xtb_500K_20frames.npz"
ASPIRIN = DATA / "aspirin_xtb_500K.npz"
BIN = Path(PY).parent  # the venv's launchers, as a user calls them
#: what every md22_atat run below changes: the shipped 20 AT-AT frames, 2 molecules per step, one per forward
ATAT_SETS = [f"data.path={ATAT}", "data.train_size=8", "data.val_size=4", "data.test_size=4",
             "train.batch_size=2", "memory.micro_batch_size=1", "train.max_steps=2", "train.log_every=1"]


def _launcher(name: str) -> list[str]:
    exe = BIN / name
    if exe.is_file():
        return [str(exe)]
    return [PY, "-m", {"deepspeed": "deepspeed.launcher.runner", "torchrun": "torch.distributed.run"}[name]]


def _free_port() -> str:
    from test_train_common import free_port

    return str(free_port())


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


# -- every config: loads, builds, computes; valid DeepSpeed config and batch plans ---------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads_builds_and_computes(name):
    from scalable_equiformer.config import load_config
    from scalable_equiformer.nn.forces import energy_and_forces
    from scalable_equiformer.profiling.measured_step import build, make_batch
    from scalable_equiformer.training.batches import BatchPlan
    from scalable_equiformer.training.engine import DS_BUCKET_ALIGNMENT, deepspeed_config

    cfg = load_config(f"{name}.yaml", [f"data.path={ASPIRIN}"])
    torch.manual_seed(0)
    model, dtype = build(cfg, "cpu", 21)
    n_params = sum(p.numel() for p in model.parameters())
    if name.startswith(("md17_", "md22_")) and not name.endswith("_l3"):
        assert n_params == PAPER_PARAMS, (name, n_params)
    assert len(model.blocks) == cfg.model.num_blocks
    with np.load(ASPIRIN) as d:
        batch = make_batch(d["z"], d["R"][:2], dtype, "cpu")
    model.eval()
    out = energy_and_forces(model, batch, training=False)
    assert out["energy"].shape == (2,) and out["forces"].shape == (42, 3)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    assert float(out["forces"].abs().max()) > 0

    # the settings derived from the model's and the world's size, at the world sizes people launch
    b = cfg.train.batch_size
    for world in (1, 2, 4, 8):
        for parts in (1, 2, 4):
            dp = world // parts
            if world % parts or b % dp:
                continue
            plan = BatchPlan.from_config(cfg, dp)
            assert plan.micro_batch_size * plan.grad_accum * dp == b
            assert plan.micro_batch_size <= (cfg.memory.micro_batch_size or b)
            for stage in (0, 1, 2, 3):
                cfg.deepspeed.zero_stage = stage
                zero = deepspeed_config(cfg, plan, world, num_params=n_params)["zero_optimization"]
                for key in ("reduce_bucket_size", "allgather_bucket_size"):
                    if stage:
                        assert zero[key] >= n_params and zero[key] % DS_BUCKET_ALIGNMENT == 0, (name, stage, key)


def test_micro_batch_size_is_a_cap_per_rank():
    """md22_atat.yaml's memory.micro_batch_size 4 with batch 8: on 1, 2, 4 and 8 data-parallel ranks the
    per-rank share is 8, 4, 2 and 1 molecules; the micro-batch is at most 4 and divides the share."""
    from scalable_equiformer.config import load_config
    from scalable_equiformer.errors import ConfigError
    from scalable_equiformer.training.batches import BatchPlan

    cfg = load_config("md22_atat", [f"data.path={ATAT}"])
    got = {dp: (p.micro_batch_size, p.grad_accum) for dp in (1, 2, 4, 8) for p in [BatchPlan.from_config(cfg, dp)]}
    assert got == {1: (4, 2), 2: (4, 1), 4: (2, 1), 8: (1, 1)}
    with pytest.raises(ConfigError, match=r"memory.micro_batch_size \(3\) must divide the molecules per rank per step "
                                          r"\(train.batch_size 8 / 1 data-parallel ranks = 8\)"):
        BatchPlan.from_config(load_config("md22_atat", [f"data.path={ATAT}", "memory.micro_batch_size=3"]), 1)
    with pytest.raises(ConfigError, match="multiple of the data-parallel ranks"):
        BatchPlan.from_config(cfg, 16)


def test_zero_bucket_is_aligned_for_any_parameter_count():
    from scalable_equiformer.training.engine import DS_BUCKET_ALIGNMENT, DS_BUCKET_DEFAULT, zero_bucket_size

    assert DS_BUCKET_ALIGNMENT == 2  # deepspeed/runtime/zero/stage_1_and_2.py: nccl_start_alignment_factor
    assert zero_bucket_size(PAPER_PARAMS) == PAPER_PARAMS + 1
    assert zero_bucket_size(8_000) == 1 << 20
    assert zero_bucket_size(10**10) == DS_BUCKET_DEFAULT
    for n in (2**20 + 1, 2**20 + 2, 7_000_001, DS_BUCKET_DEFAULT - 1):
        assert zero_bucket_size(n) % 2 == 0 and n <= zero_bucket_size(n) <= n + 1


# -- the users' launch commands on the paper's model ---------------------------------------------------------

@pytest.fixture(scope="module")
def atat_runs(tmp_path_factory):
    """``deepspeed --num_gpus 2 train.py --config md22_atat.yaml`` with ZeRO 1, 2, 3 and with 2 graph
    partitions (ZeRO 2), from a folder outside the repository."""
    root = tmp_path_factory.mktemp("md22_atat")
    runs = {}
    for key, extra in (("zero1", ["deepspeed.zero_stage=1"]), ("zero2", ["deepspeed.zero_stage=2"]),
                       ("zero3", ["deepspeed.zero_stage=3"]), ("p2", ["parallel.graph_partitions=2"])):
        cmd = _launcher("deepspeed") + ["--num_gpus", "2", "--master_port", _free_port(), str(REPO / "train.py"),
                                        "--config", "md22_atat.yaml",
                                        *sets(ATAT_SETS + extra + [f"train.run_name={key}"])]
        runs[key] = (launch(cmd, cwd=root, timeout=600), root / "runs" / key)
    return runs


@pytest.mark.parametrize("key,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_deepspeed_md22_atat_trains_with_each_zero_stage(atat_runs, key, stage):
    proc, run = atat_runs[key]
    _ok(proc)
    out = proc.stdout
    assert f"Equiformer: {PAPER_PARAMS} parameters" in out
    assert (f"2 rank(s) (DeepSpeed ZeRO stage {stage}, gloo backend, launcher deepspeed) = 2 data-parallel x 1 graph"
            in out)
    assert "batch 2 molecules per step = 2 rank(s) x 1 micro-batch(es) x 1" in out
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows if r["val_force_mae_meV_per_A"]][-1] == 2
    r = results(run)
    assert r["steps"] == 2 and r["n_test_frames"] == 4
    assert all(math.isfinite(r[k]) for k in ("test_energy_mae_meV", "test_force_mae_meV_per_A"))
    assert (run / "deepspeed").is_dir()
    ck = torch.load(run / "best.pt", weights_only=True)  # consolidated from the shards: full shapes
    assert sum(v.numel() for k, v in ck["model"].items() if v.is_floating_point() and v.dim() > 0) >= PAPER_PARAMS


def test_zero_stages_and_graph_partitions_follow_one_trajectory(atat_runs):
    """All four runs train on the same 2 molecules per step (2 ranks x 1, or 1 group of 2 partitions x 2
    micro-batches): losses and validation MAEs agree to fp32 reduction order."""
    for key in atat_runs:
        _ok(atat_runs[key][0])
    ref = read_metrics(atat_runs["zero2"][1])
    assert "1 data-parallel x 2 graph partitions" in atat_runs["p2"][0].stdout
    for key in ("zero1", "zero3", "p2"):
        rows = read_metrics(atat_runs[key][1])
        assert len(rows) == len(ref) >= 2, key
        for a, b in zip(rows, ref):
            for col in ("train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A", "lr"):
                if b[col] == "":
                    assert a[col] == "", (key, col)
                else:
                    assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-4), (key, col, a, b)


def test_evaluate_a_zero_checkpoint_of_the_paper_model(atat_runs, tmp_path):
    """README section 2 on the ZeRO-3 run's best.pt: its test split, the run's own test metrics."""
    proc, run = atat_runs["zero3"]
    _ok(proc)
    out = tmp_path / "eval.json"
    ev = _ok(launch([PY, str(REPO / "tools" / "evaluate.py"), str(run / "best.pt"), "--data", str(ATAT),
                     "--json", str(out)], cwd=tmp_path, timeout=300))
    assert "4 frames" in ev.stdout
    got, want = json.loads(out.read_text()), results(run)
    assert got["energy_mae_meV"] == pytest.approx(want["test_energy_mae_meV"], rel=1e-5)
    assert got["force_mae_meV_per_A"] == pytest.approx(want["test_force_mae_meV_per_A"], rel=1e-5)


def test_torchrun_md17_aspirin_trains(tmp_path):
    cmd = _launcher("torchrun") + ["--nproc_per_node", "2", "--master_port", _free_port(), str(REPO / "train.py"),
                                   "--config", "md17_aspirin", *sets([f"data.path={ASPIRIN}", "data.test_size=16",
                                                                      "train.max_steps=2", "train.run_name=aspirin"])]
    proc = _ok(launch(cmd, cwd=tmp_path, timeout=600))
    assert f"Equiformer: {PAPER_PARAMS} parameters" in proc.stdout
    assert "2 rank(s) (DeepSpeed ZeRO stage 0, gloo backend, launcher torchrun) = 2 data-parallel" in proc.stdout
    assert "batch 8 molecules per step = 2 rank(s) x 1 micro-batch(es) x 4" in proc.stdout
    r = results(tmp_path / "runs" / "aspirin")
    assert r["steps"] == 2 and r["n_test_frames"] == 16 and math.isfinite(r["test_force_mae_meV_per_A"])


# -- the other README tools on a paper-size config ------------------------------------------------------------

def test_memory_profile_measures_the_md22_atat_model(tmp_path):
    out = tmp_path / "mp.json"
    _ok(launch([PY, str(REPO / "tools" / "memory_profile.py"), "--config", "md22_atat", "--atoms", "60",
                "--batch-size", "1", "--levers", "none", "--levers", "checkpointing=forces",
                "--timing-steps", "0", "--json", str(out)], cwd=tmp_path, timeout=600))
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2
    none, forces = runs
    for r in runs:
        assert r["num_params"] == PAPER_PARAMS and r["atoms"] == 60 and r["batch"] == 1 and r["peak_bytes"] > 0
    assert forces["peak_bytes"] < none["peak_bytes"]


def test_reproduce_md22_atat_at_paper_size(tmp_path):
    proc = _ok(launch([PY, str(REPO / "tools" / "reproduce.py"), "md22", "--systems", "atat",
                       "--out", str(tmp_path / "r"), "--no-plot", "--set", *ATAT_SETS], cwd=tmp_path, timeout=600))
    table = (tmp_path / "r" / "md22" / "table.md").read_text()
    row = next(line for line in table.splitlines() if "AT-AT" in line or "atat" in line)
    assert "failed" not in row and "running" not in row, table
    summary = json.loads((tmp_path / "r" / "md22" / "summary.json").read_text())
    assert proc.returncode == 0 and summary


# -- the memory levers at the paper model's size ---------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_model_fp64():
    from scalable_equiformer.config import load_config
    from scalable_equiformer.profiling.measured_step import build, make_batch

    cfg = load_config("md17_aspirin", [f"data.path={ASPIRIN}", "model.dtype=float64"])
    torch.manual_seed(0)
    model, dtype = build(cfg, "cpu", 21)
    with np.load(ASPIRIN) as d:
        batch = make_batch(d["z"], d["R"][:1], dtype, "cpu")
        batch.energy = torch.tensor([0.3], dtype=dtype)
        batch.forces = torch.as_tensor(d["F"][0] / 23.060547830619026, dtype=dtype)
    return model, batch


@pytest.mark.parametrize("strategy,chunk,keep", [("blocks", None, 0), ("forces", 48, 2), ("forces", None, 5)],
                         ids=["blocks", "forces+chunks+keep2", "forces+keep5"])
def test_levers_equal_plain_at_paper_size(paper_model_fp64, strategy, chunk, keep):
    from test_memory_levers import _assert_same, _step

    model, batch = paper_model_fp64
    n_edges = None
    if chunk:
        from scalable_equiformer.nn.graph import radius_graph

        n_edges = radius_graph(batch.pos, 5.0, batch.batch).shape[1]
        assert n_edges > 4 * chunk  # several chunks
    ref = _step(model, batch, "none")
    _assert_same(_step(model, batch, strategy, chunk=chunk, keep=keep), ref, tol=1e-10, what=strategy)


def test_bf16_at_paper_size(paper_model_fp64):
    from test_memory_levers import TOLERANCE_16, _precision_step, _rel

    model64, batch64 = paper_model_fp64
    model = __import__("copy").deepcopy(model64).float()
    batch = batch64.clone()
    batch.pos, batch.energy, batch.forces = batch.pos.float(), batch.energy.float(), batch.forces.float()
    e32, f32, g32 = _precision_step(model, batch, "fp32")
    e16, f16, g16 = _precision_step(model, batch, "bf16", "forces")
    force_tol, grad_tol = TOLERANCE_16["bf16"]
    assert torch.isfinite(g16).all() and _rel(f16, f32) < force_tol and _rel(g16, g32) < grad_tol
