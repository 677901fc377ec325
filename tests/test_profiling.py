"""The memory profiler: synthetic molecules, the estimate's bookkeeping, the planner's choice, one
real measurement in a subprocess, and the command line end to end (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_sets
from scalable_equiformer.config import load_config
from scalable_equiformer.memory import Levers
from scalable_equiformer.nn.graph import radius_graph
from scalable_equiformer.profiling import estimate as est
from scalable_equiformer.profiling import planner, systems
from scalable_equiformer.profiling.profiler import Request, measure, measure_many

ROOT = Path(__file__).resolve().parents[1]
SMALL = tiny_sets(width=2, avg_num_neighbors=20, avg_num_atoms=20)


# ---- molecules --------------------------------------------------------------------------------


def test_synthetic_molecule_has_real_density_and_no_clashes():
    z, pos = systems.synthetic_molecule(130)
    assert z.shape == (130,) and pos.shape == (130, 3)
    edges = systems.count_edges(pos, 5.0)
    assert 24 <= edges / 130 <= 32  # the original's 120-atom system: 27.6 edges per atom
    # copies never overlap: atoms of different copies stay >= 2.5 Å apart (within a copy: bonds)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    copy = np.arange(130) // 60
    assert d[copy[:, None] != copy[None]].min() >= systems.CONTACT - 1e-6
    z2, pos2 = systems.synthetic_molecule(70)  # prefixes of one build: sweeps share atoms
    np.testing.assert_array_equal(pos2, pos[:70])
    np.testing.assert_array_equal(z2, z[:70])


def test_count_edges_matches_the_models_radius_graph():
    _, pos = systems.synthetic_molecule(90)
    assert systems.count_edges(pos, 5.0) == radius_graph(torch.as_tensor(pos), 5.0).shape[1]


def test_load_frames_cycles_through_a_data_file(tmp_path):
    f = tmp_path / "m.npz"
    R = np.random.default_rng(0).normal(size=(3, 4, 3)) * 2
    np.savez(f, R=R, z=np.array([1, 6, 7, 8]), E=np.zeros((3, 1)), F=np.zeros((3, 4, 3)))
    z, frames = systems.load_frames(f, 5)
    assert z.tolist() == [1, 6, 7, 8] and frames.shape == (5, 4, 3)
    np.testing.assert_allclose(frames[3], R[0])


# ---- estimate bookkeeping --------------------------------------------------------------------


def test_model_states_per_zero_stage_and_ranks():
    p = 3_500_000
    s0 = est.model_states(p)
    assert (s0.params, s0.grads, s0.optimizer) == (4 * p, 4 * p, 8 * p)
    s1 = est.model_states(p, zero_stage=1, ranks=4)
    assert (s1.params, s1.grads, s1.optimizer) == (4 * p, 4 * p, 2 * p)
    s2 = est.model_states(p, zero_stage=2, ranks=4)
    assert (s2.grads, s2.optimizer) == (p, 2 * p)
    s3 = est.model_states(p, zero_stage=3, ranks=4, largest_layer=1000)
    assert s3.params == p + 4000 and s3.total < s2.total
    assert est.model_states(p, param_bytes=8).total == 2 * s0.total
    with pytest.raises(ValueError):
        est.model_states(p, zero_stage=4)


def _fake_profile():
    lin = est.Linear
    return est.ActivationProfile(plain=lin(1000.0, 500.0), blocks=lin(700.0, 400.0), forces_kept=lin(10.0, 20.0),
                                 stage=lin(150.0, 80.0), stage_node=80.0)


def test_activation_estimate_follows_the_levers():
    prof = _fake_profile()

    def act(**kw):
        return est.activation_bytes(prof, Levers(**kw), atoms=100, edges=3000, batch=4, calibration={
            "none": 1.0, "blocks": 1.0, "forces": 1.0})[0]

    none = act()
    assert none == 4 * (1000 * 3000 + 500 * 100)
    assert act(checkpointing="blocks") < none
    assert act(checkpointing="forces") < act(checkpointing="blocks")
    assert act(micro_batch_size=1) == pytest.approx(none / 4, rel=1e-6)
    forces1 = act(checkpointing="forces", micro_batch_size=1)
    chunked = act(checkpointing="forces", micro_batch_size=1, edge_chunk_size=500)
    assert chunked == int(10 * 3000 + 20 * 100 + 150 * 500 + 80 * 100) and chunked < forces1
    assert act(checkpointing="forces", micro_batch_size=1, edge_chunk_size=10**6) == forces1


def test_levers_overrides_and_labels():
    lv = Levers("forces", 2, None, "bf16", 4, 1)
    assert lv.overrides() == ["memory.checkpointing=forces", "memory.micro_batch_size=2",
                              "memory.edge_chunk_size=null", "memory.precision=bf16", "parallel.graph_partitions=4",
                              "memory.keep_blocks=1"]
    assert lv.label() == "P=4+ckpt=forces+keep=1+micro=2+bf16" and Levers().label() == "none"
    cfg = load_config(None, ["data.name=x", *[f"--set {o}".split()[1] for o in lv.overrides()]])
    assert cfg.memory == lv
    assert load_config(None, ["data.name=x"]).memory.graph_partitions == 1


def test_kept_blocks_trade_memory_for_time():
    prof = _fake_profile()
    cal = {"none": 1.0, "blocks": 1.0, "forces": 1.0}

    def act(**kw):
        return est.activation_bytes(prof, Levers(checkpointing="forces", **kw), atoms=100, edges=3000, batch=1,
                                    calibration=cal)[0]

    assert act(keep_blocks=2) - act() == int(2 * (150 * 3000 + 80 * 100))  # two whole stage graphs
    t = lambda k: planner.relative_time(Levers("forces", keep_blocks=k), batch=1, edges=3000, num_blocks=6)  # noqa: E731
    assert t(0) == planner.CHECKPOINT_TIME["forces"] > t(2) > t(5) > 1.0
    assert t(6) == pytest.approx(1.0 + planner.FORCES_FIXED)  # every block kept: the plain cost + the machinery's
    gib = 2**30

    def fake(lv, per_group):  # one molecule: plain 6 GiB, forces 1 GiB + 0.8 GiB per kept block
        if lv.checkpointing == "forces" and not lv.edge_chunk_size:
            return int((1.0 + 0.8 * lv.keep_blocks) * gib)
        return int({"none": 6.0, "blocks": 4.0, "forces": 0.6}[lv.checkpointing] * gib)

    pl = planner.plan(fake, 3.5 * gib, batch=1, edges=3000, device="cuda", reserve=0, headroom=0.0, num_blocks=6)
    assert pl.best.levers == Levers("forces", keep_blocks=3)  # 3.4 GiB: the most kept blocks that fit
    assert "memory.keep_blocks=3" in pl.overrides()
    assert all(c.levers.keep_blocks == 0 for c in planner.plan(fake, 3.5 * gib, batch=1, edges=3000).candidates)


def test_partition_stats_and_per_rank_activations():
    _, pos = systems.synthetic_molecule(120)
    edges = systems.count_edges(pos, 5.0)
    s2, s4 = est.partition_stats(pos, 5.0, 2), est.partition_stats(pos, 5.0, 4)
    assert s2.parts == 2 and edges / 2 <= s2.edges <= 0.6 * edges  # balanced by incoming edges
    assert edges / 4 <= s4.edges < s2.edges and s4.edge_fraction == pytest.approx(s4.edges / edges)
    assert 120 / 4 < s4.local_atoms < s2.local_atoms < 120  # owned + halo
    prof = _fake_profile()
    cal = {"none": 1.0, "blocks": 1.0, "forces": 1.0}

    def act(parts, part=None, **kw):
        return est.activation_bytes(prof, Levers(graph_partitions=parts, **kw), atoms=120, edges=edges, batch=1,
                                    calibration=cal, part=part)[0]

    assert act(4, s4) == int(1000 * s4.edges + 500 * s4.local_atoms)  # the largest part's graph
    assert act(4, s4) < act(2, s2) < act(1)
    assert act(2) == int(1000 * -(-edges // 2) + 500 * 120)  # no partition at hand: edges split evenly
    assert act(4, s2) == act(4)  # stats of another P are not used
    assert act(4, s4, checkpointing="forces") < act(4, s4)


# ---- planner ------------------------------------------------------------------------------------


def test_parse_bytes():
    assert planner.parse_bytes("40GB") == 40 * 2**30
    assert planner.parse_bytes("80 GiB") == 80 * 2**30
    assert planner.parse_bytes("512MB") == 512 * 2**20
    assert planner.parse_bytes("1e9") == 10**9
    with pytest.raises(Exception, match="gpu-memory"):
        planner.parse_bytes("lots")


def test_planner_picks_the_fastest_lever_set_that_fits():
    gib = 2**30

    def fake(lv, per_group):  # a fake estimate: 10 GiB per molecule in the graph, less with levers
        micro = lv.micro_batch_size or per_group
        per = {"none": 10.0, "blocks": 7.0, "forces": 1.5}[lv.checkpointing]
        if lv.edge_chunk_size:
            per = 0.5
        if lv.precision == "bf16":
            per *= 0.6
        return int((1.0 + micro * per) * gib)

    kw = dict(batch=8, edges=4000, device="cuda", reserve=0, headroom=0.0)
    big = planner.plan(fake, 200 * gib, **kw)
    assert big.best.levers == Levers()  # everything fits: levers off is fastest
    mid = planner.plan(fake, 12 * gib, **kw)
    assert mid.best.levers == Levers(micro_batch_size=1)  # micro-batching costs least time
    small = planner.plan(fake, 2.8 * gib, **kw)
    assert small.best.levers.checkpointing == "forces" and small.best.peak_bytes <= 2.8 * gib
    assert small.best.levers.edge_chunk_size is None  # chunks only when needed
    tiny = planner.plan(fake, 1.6 * gib, **kw)
    assert tiny.best.levers.edge_chunk_size is not None
    assert planner.plan(fake, 1.0 * gib, **kw).best is None
    with_bf16 = planner.plan(fake, 12 * gib, precisions=("fp32", "bf16"), **kw)
    assert with_bf16.best.levers.precision == "bf16"  # faster on a GPU, when allowed
    assert all(c.levers.precision == "fp32" for c in mid.candidates)
    assert mid.overrides() == Levers(micro_batch_size=1).overrides()
    # the candidates are sorted: fitting first, then by expected time
    fits = [c for c in mid.candidates if c.fits]
    assert [c.relative_time for c in fits] == sorted(c.relative_time for c in fits)


def test_planner_uses_data_parallel_first_and_graph_partitions_when_one_molecule_does_not_fit():
    gib = 2**30

    def fake(lv, per_group):  # 12 GiB per molecule, split over the partitions; forces saves 5x
        micro = lv.micro_batch_size or per_group
        per = 12.0 / lv.graph_partitions * (0.2 if lv.checkpointing == "forces" else 1.0)
        return int((0.5 + micro * per) * gib)

    kw = dict(batch=4, edges=3000, device="cuda", reserve=0, headroom=0.0, gpus=4)
    dp = planner.plan(fake, 16 * gib, **kw)
    assert dp.best.levers == Levers()  # one molecule per GPU fits: plain data parallel
    assert {c.levers.graph_partitions for c in dp.candidates} == {1, 2, 4}
    assert dp.best.relative_time == pytest.approx(0.25)
    split = planner.plan(fake, 4 * gib, batch=1, edges=3000, device="cuda", reserve=0, headroom=0.0, gpus=4,
                         edge_fractions={2: 0.52, 4: 0.27})
    # 12 GiB per molecule: P=4 fits without recomputation (3.5 GiB), faster than forces on one GPU
    assert split.best.levers == Levers(graph_partitions=4)
    assert split.best.relative_time == pytest.approx(0.27 * (1 + planner.PARTITION_OVERHEAD))
    assert "parallel.graph_partitions=4" in split.overrides()
    one = planner.plan(fake, 4 * gib, batch=1, edges=3000, device="cuda", reserve=0, headroom=0.0, gpus=1)
    assert one.best.levers.checkpointing == "forces" and one.best.levers.graph_partitions == 1
    # batch 2 on 4 GPUs: 4 data-parallel groups do not divide the batch, so P >= 2
    assert {c.levers.graph_partitions for c in planner.plan(fake, 64 * gib, **dict(kw, batch=2)).candidates} == {2, 4}
    # edge chunks are not offered with partitions
    assert all(c.levers.edge_chunk_size is None for c in split.candidates if c.levers.graph_partitions > 1)


def test_relative_time_orders_the_levers():
    t = lambda **kw: planner.relative_time(Levers(**kw), batch=8, edges=3000, device="cuda")  # noqa: E731
    assert t() == 1.0 < t(checkpointing="blocks") < t(checkpointing="forces")
    assert t(micro_batch_size=1) > t(micro_batch_size=4) > 1.0
    assert t(checkpointing="forces", micro_batch_size=1, edge_chunk_size=500) > \
        t(checkpointing="forces", micro_batch_size=1)


# ---- measurement and command line -------------------------------------------------------------


@pytest.fixture(scope="module")
def census_and_runs():
    """One census of the small model and two real measurements (fresh subprocesses)."""
    cfg = load_config(None, ["data.name=x", *SMALL])
    prof = est.activation_profile(cfg)
    runs = {lev: measure(Request(config=cfg.to_dict(), config_name="small", atoms=60, batch=1,
                                 levers={"checkpointing": lev}, timing_steps=0), timeout=600)
            for lev in ("none", "forces")}
    return cfg, prof, runs


def test_measurement_reports_the_step_and_forces_checkpointing_saves(census_and_runs):
    cfg, prof, runs = census_and_runs
    none, forces = runs["none"], runs["forces"]
    for r in (none, forces):
        assert r["method"] in ("cpu_vmhwm_clear_refs", "cpu_vmhwm_baseline")
        assert r["atoms"] == 60 and r["edges"] == systems.count_edges(systems.synthetic_molecule(60)[1], 5.0)
        assert r["peak_bytes"] >= r["activation_bytes"] > 0 and r["step_seconds"] > 0
        assert r["params_bytes"] == 4 * r["num_params"] and r["optimizer_bytes"] == 2 * r["params_bytes"]
        assert np.isfinite(r["loss"])
    # a real saving, by peak RSS of a 2-block model: since the fused path's levers-off activations
    # shrank (-31 % per edge, benchmarks/speed.md) the ratio here sits at ~0.55-0.61; the paper
    # model's ratio (96 against 528 KB per edge, --meter alloc) is a benchmark, not this test
    assert forces["activation_bytes"] < 0.75 * none["activation_bytes"]
    # the census estimate is in the right range (the ±20 % check on the paper's model is a benchmark)
    e = est.activation_bytes(prof, Levers(), atoms=60, edges=none["edges"], batch=1)[0]
    assert 0.5 < none["activation_bytes"] / e < 2.0


def test_partitioned_measurement_reports_the_largest_rank(census_and_runs):
    cfg, _, runs = census_and_runs
    r = measure(Request(config=cfg.to_dict(), config_name="small", atoms=60, batch=1, levers={"checkpointing": "none"},
                        partitions=2, timing_steps=0), timeout=600)
    assert r["levers"]["graph_partitions"] == 2 and len(r["per_rank"]) == 2
    ranks = r["per_rank"]
    assert sum(x["rank_owned"] for x in ranks) == 60  # every atom owned once
    assert sum(x["rank_edges"] for x in ranks) == r["edges"] == runs["none"]["edges"]  # every edge once
    assert r["rank_edges"] == max(x["rank_edges"] for x in ranks) < r["edges"]
    assert r["peak_bytes"] == max(x["peak_bytes"] for x in ranks)
    assert r["loss"] == pytest.approx(runs["none"]["loss"], rel=1e-4)  # the same model and step
    assert r["activation_bytes"] < 0.8 * runs["none"]["activation_bytes"]


def test_measure_many_runs_in_one_process_records_failures_and_stops_at_the_budget():
    """One worker for all measurements (what a GPU sweep uses): a failing step is recorded and the
    next one runs; what the time budget does not cover is recorded as not measured."""
    cfg = load_config(None, ["data.name=x", *SMALL])
    base = dict(config=cfg.to_dict(), config_name="small", atoms=12, batch=1, timing_steps=0)
    reqs = [Request(**base, levers={"checkpointing": "none"}), Request(**base, levers={"checkpointing": "bogus"}),
            Request(**base, levers={"checkpointing": "forces"})]
    seen = []
    out = measure_many(reqs, timeout=600, on_result=lambda i, r: seen.append(i))
    assert seen == [0, 1, 2]
    for r in (out[0], out[2]):
        assert r["one_process"] and r["peak_bytes"] >= r["activation_bytes"] > 0 and r["atoms"] == 12
    assert out[2]["levers"]["checkpointing"] == "forces"
    assert "bogus" in out[1]["error"] and "peak_bytes" not in out[1]
    cut = measure_many(reqs, timeout=0.5)
    assert all(r.get("not_measured") for r in cut) and "time budget" in cut[0]["error"]


def test_command_line_json_table_plot_and_plan(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("data:\n  name: synthetic\nmodel:\n" + "".join(
        f"  {o.split('=')[0].split('.')[1]}: {o.split('=')[1]}\n" for o in SMALL) + "train:\n  batch_size: 2\n")
    out, png = tmp_path / "mem.json", tmp_path / "mem.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "memory_profile.py"), "--config", str(cfg), "--atoms", "24",
         "--levers", "none", "--levers", "checkpointing=forces,micro_batch_size", "--levers", "partitions=2",
         "--timing-steps", "0", "--json", str(out), "--plot", str(png), "--plan", "--gpu-memory", "8GB", "--gpus", "2"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "meas/est" in proc.stdout and "use: --set memory.checkpointing=none" in proc.stdout
    assert "launch: deepspeed --num_gpus 2 train.py" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["device"].startswith("cpu")
    assert len(doc["runs"]) == 3
    assert doc["runs"][2]["levers"]["graph_partitions"] == 2 and len(doc["runs"][2]["per_rank"]) == 2
    assert doc["plan"]["gpus"] == 2 and doc["plan"]["best"]["levers"]["graph_partitions"] == 1  # data parallel fits
    for r in doc["runs"]:
        for key in ("config", "atoms", "edges", "batch", "levers", "peak_bytes", "activation_bytes", "step_seconds"):
            assert key in r
        assert r["atoms"] == 24 and r["batch"] == 2
    assert doc["runs"][1]["levers"] == {"checkpointing": "forces", "micro_batch_size": 1, "edge_chunk_size": None,
                                        "precision": "fp32", "graph_partitions": 1, "keep_blocks": 0}
    assert doc["plan"]["best"]["levers"]["checkpointing"] == "none"
    assert png.stat().st_size > 1000


def test_command_line_errors_name_the_problem(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "memory_profile.py"), "--atoms", "10",
                           "--levers", "checkpointing,speed", "--estimate-only"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "unknown lever 'speed'" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "memory_profile.py"), "--atoms", "10",
                           "--levers", "graph_partitions=2,edge_chunk_size=256", "--estimate-only"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "edge_chunk_size is single-process only" in proc.stderr


# ---- time factors: CPU measured, CUDA from a GPU run's JSON (none yet) -------------------------


def _fake_cuda_profile():
    """A memory_profile JSON as a GPU run writes it, with made-up times whose ratios are known:
    blocks 1.2, forces 1.6, bf16 0.5, forces_fixed 0.2 (keep 3 of 6 blocks: 1.4), chunk overhead
    0.05 (4 chunks: 1.6 x 1.15). A test fixture, not a measurement."""
    gib = 2**30
    runs = []
    for atoms, t0 in ((60, 0.1), (120, 0.3)):
        for lev, x in ((dict(), 1.0), (dict(checkpointing="blocks"), 1.2), (dict(checkpointing="forces"), 1.6),
                       (dict(precision="bf16"), 0.5), (dict(checkpointing="forces", keep_blocks=3), 1.4),
                       (dict(checkpointing="forces", edge_chunk_size=250), 1.6 * 1.15)):
            lv = {"checkpointing": "none", "micro_batch_size": None, "edge_chunk_size": None, "precision": "fp32",
                  "graph_partitions": 1, "keep_blocks": 0, **lev}
            runs.append({"atoms": atoms, "batch": 8, "edges": 1000, "data": None, "levers": lv, "step_seconds": t0 * x,
                         "peak_bytes": int(gib * 100 / x), "activation_bytes": int(gib * 99 / x),
                         "bytes_per_edge": 1e5, "estimated_peak_bytes": int(gib * 90 / x),
                         "ratio_measured_estimated": 1.1, "time_ratio": x, "rank_edges": 1000,
                         "device_total_memory_bytes": 140 * gib})
    runs[6]["peak_bytes"] = int(150 * gib)  # 120 atoms, levers off: past the device's memory
    runs.append({**runs[7], "levers": {**runs[7]["levers"], "micro_batch_size": 2}, "oom": True})
    for k in ("peak_bytes", "step_seconds", "time_ratio"):
        runs[-1].pop(k)
    return {"device": "cuda:FAKE test fixture", "config": "x", "num_params": 3_500_000, "num_blocks": 6, "batch": 8,
            "runs": runs}


def test_time_factors_from_a_cuda_profile():
    f = planner.factors_from_profile(_fake_cuda_profile())
    assert f["factors"] == {"checkpoint": {"blocks": 1.2, "forces": 1.6}, "precision": {"bf16": 0.5},
                            "forces_fixed": pytest.approx(0.2), "chunk_overhead": pytest.approx(0.05)}
    assert "measured on cuda:FAKE" in f["source"] and "60 atoms x 8, 120 atoms x 8" in f["source"]
    assert len(f["samples"]["checkpoint.forces"]) == 2


def test_no_cuda_figures_yet_means_assumed_factors_that_say_so():
    shipped = json.loads(planner.CUDA_FACTORS_FILE.read_text())
    assert shipped["factors"] is None and "no CUDA figures" in shipped["source"]
    f = planner.time_factors("cuda")
    assert f is planner.CUDA_ASSUMED and f.source.startswith("CUDA: no CUDA figures yet")
    assert planner.time_factors("cpu") is planner.CPU_FACTORS
    pl = planner.plan(lambda lv, b: 1, 2**30, batch=1, edges=100, device="cuda")
    assert pl.factors is planner.CUDA_ASSUMED


def test_cuda_factors_written_by_memory_tables_reach_the_planner(tmp_path, monkeypatch):
    prof = tmp_path / "memory_profile.json"
    prof.write_text(json.dumps(_fake_cuda_profile()))
    out = tmp_path / "time_factors_cuda.json"
    tool = [sys.executable, str(ROOT / "tools" / "memory_tables.py")]
    proc = subprocess.run(tool + [str(prof), "--cuda-factors", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setattr(planner, "CUDA_FACTORS_FILE", out)
    f = planner.time_factors("cuda")
    assert f.precision["bf16"] == 0.5 and f.checkpoint["forces"] == 1.6 and f.forces_fixed == pytest.approx(0.2)
    assert f.precision["fp16"] == planner.CUDA_ASSUMED.precision["fp16"]  # not measured: stays assumed
    assert f.micro_overhead == planner.CUDA_ASSUMED.micro_overhead and "measured on cuda" in f.source
    assert planner.relative_time(Levers(precision="bf16"), batch=8, edges=1000, device="cuda") == 0.5
    assert planner.relative_time(Levers(precision="bf16"), batch=8, edges=1000, device="cpu") == 1.0  # CPU's own
    pl = planner.plan(lambda lv, b: 1, 2**30, batch=8, edges=1000, device="cuda", precisions=("fp32", "bf16"))
    assert pl.best.levers.precision == "bf16" and pl.factors.source == f.source
    # a CPU JSON is refused: its ratios are not CUDA figures
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({**_fake_cuda_profile(), "device": "cpu:AMD EPYC"}))
    proc = subprocess.run(tool + [str(cpu), "--cuda-factors", str(tmp_path / "x.json")], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and "not CUDA" in proc.stderr and not (tmp_path / "x.json").exists()


def test_memory_tables_report_says_what_fits():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import memory_tables
    finally:
        sys.path.remove(str(ROOT / "tools"))
    text = memory_tables.report(_fake_cuda_profile(), "fake.json")
    assert "step s (GPU)" in text and "| ckpt=micro" not in text
    fit = text.split("## Does the largest molecule fit?")[1].split("##")[0]
    assert "120 atoms, batch 8" in fit and "140.0 GiB" in fit
    assert "| none | 150.00 (107 %) | no |" in fit and "| ckpt=forces | 62.50 (45 %) | yes |" in fit
    assert "| ckpt=blocks+micro=2 | out of memory | no |" in fit
    assert "| checkpoint.forces | 1.600 |" in text


def test_plan_across_nodes_keeps_partitions_within_a_node():
    """--gpus N --gpus-per-node G: graph partitions P divide G (a molecule on one node); the launch
    lines are the README's multi-node forms."""
    from scalable_equiformer.errors import UserError

    assert planner.node_partitions(8, 8) == [1, 2, 4, 8]  # one node: every divisor
    assert planner.node_partitions(8, 8, 4) == [1, 2, 4]  # 2 nodes of 4: P = 8 would span both
    assert planner.node_partitions(8, 8, 8) == [1, 2, 4, 8]
    # also: 12 / P data-parallel groups divide the batch (not P = 1, 3)
    assert planner.node_partitions(12, 6, 6) == [2, 6]
    with pytest.raises(UserError, match="--gpus-per-node 3 must divide --gpus 8"):
        planner.node_partitions(8, 8, 3)
    assert planner.launch_lines(4, None, "--config c --set x=1") == \
        ["deepspeed --num_gpus 4 train.py --config c --set x=1"]
    lines = planner.launch_lines(8, 4, "--config c")
    assert lines[0] == ("torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 4 --rdzv_backend c10d "
                        "--rdzv_endpoint NODE0:29500 train.py --config c")
    assert lines[1].startswith("deepspeed --hostfile hostfile --master_addr NODE0 --master_port 29500 "
                               "train.py --config c")
    assert "2 lines 'HOST slots=4'" in lines[1]
    assert lines[2] == ("deepspeed --no_ssh --node_rank $NODE_RANK --master_addr NODE0 --master_port 29500 "
                        "--hostfile hostfile train.py --config c")
    # the planner only picks among the partitions it is given
    gib = 2**30
    pl = planner.plan(lambda lv, per_group: gib // lv.graph_partitions, 3.5 * gib, batch=8, edges=3000, device="cuda",
                      reserve=0, headroom=0.0, gpus=8, partitions=planner.node_partitions(8, 8, 4))
    assert {c.levers.graph_partitions for c in pl.candidates} == {1, 2, 4}
