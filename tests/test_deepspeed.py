"""Multi-rank training on CPU (gloo): launch modes and ZeRO stages against one process.

Tolerances, on every logged training loss, learning rate and validation MAE over 8 optimizer steps
against the one-process run: 2-rank plain data parallel, float64: 1e-8 relative. ZeRO 1, 2
(float64 model, 2 micro-batches of gradient accumulation per rank): 1e-5 relative — DeepSpeed's
ZeRO optimizers keep fp32 master weights even for a float64 model, so they are fp32-exact, not
fp64-exact; the same tolerance, on the consolidated weights of best.pt too, for ZeRO-2 and ZeRO-3 with
memory.checkpointing=forces. DeepSpeed stage 0 (float32 only: it all-reduces no float64): 1e-4 relative against the
float32 one-process run. ZeRO-3 takes no float64 parameters (a ConfigError): float32 model, 1e-4
against the float32 one-process run. ZeRO-3 resumed vs uninterrupted ZeRO-3 (float32): 1e-10.
Each launch takes ~15-25 s (process start, imports), so the runs are shared by module fixtures.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from test_train_common import (
    PY, REPO, empty_config, epoch_rows, free_port, launch, read_metrics, results, sets, tiny_config, tiny_overrides,
    train_in_process,
)

pytestmark = pytest.mark.slow
TORCHRUN = [PY, "-m", "torch.distributed.run"]
DEEPSPEED = [PY, "-m", "deepspeed.launcher.runner"]
COLUMNS = ("epoch", "step", "lr", "train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A")


def torchrun(*args):
    return TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(free_port()), *args]


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]


def _same_trajectory(a, b, rel):
    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb) and len(ra) >= 4
    for x, y in zip(ra, rb):
        for k in COLUMNS:
            if x[k] == "":
                assert y[k] == "", (k, x, y)
            else:
                assert float(y[k]) == pytest.approx(float(x[k]), rel=rel, abs=1e-12), (k, x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs, in-process: float64 and float32."""
    root = tmp_path_factory.mktemp("reference")
    train_in_process(tiny_config(root, run_name="fp64", dtype="float64"))
    train_in_process(tiny_config(root, run_name="fp32", dtype="float32"))
    return root


def test_torchrun_two_ranks_plain_data_parallel_equals_one_process(reference, tmp_path):
    over = tiny_overrides(tmp_path, dtype="float64", run_name="dp")
    proc = launch(torchrun(str(REPO / "train.py"), "--config", empty_config(tmp_path), *sets(over)), cwd=tmp_path)
    _check(proc)
    assert "2 rank(s) (plain torch" in proc.stdout
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone logs
    _same_trajectory(reference / "fp64", tmp_path / "dp", rel=1e-8)
    r = results(tmp_path / "dp")
    expected = results(reference / "fp64")["test_force_mae_meV_per_A"]
    assert r["test_force_mae_meV_per_A"] == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("stage", [0, 2])
def test_graph_partitions_two_ranks_equal_one_process(reference, tmp_path, stage):
    """parallel.graph_partitions=2 on 2 ranks (D=1 x P=2): one molecule's graph split over both ranks.
    Stage 0 in float64 runs the plain torch engine (1e-8); ZeRO-2 keeps fp32 master weights (1e-5)."""
    over = tiny_overrides(tmp_path, "parallel.graph_partitions=2", f"deepspeed.zero_stage={stage}", dtype="float64",
                          run_name=f"part{stage}")
    proc = launch(torchrun(str(REPO / "train.py"), "--config", empty_config(tmp_path), *sets(over)), cwd=tmp_path)
    _check(proc)
    assert "1 data-parallel x 2 graph partitions" in proc.stdout
    _same_trajectory(reference / "fp64", tmp_path / f"part{stage}", rel=1e-8 if stage == 0 else 1e-5)


def test_torchrun_two_ranks_deepspeed_stage0_follows_one_process(reference, tmp_path):
    over = tiny_overrides(tmp_path, dtype="float32", run_name="ds0")
    proc = launch(torchrun(str(REPO / "train.py"), "--config", empty_config(tmp_path), *sets(over)), cwd=tmp_path)
    _check(proc)
    assert "DeepSpeed ZeRO stage 0" in proc.stdout
    _same_trajectory(reference / "fp32", tmp_path / "ds0", rel=1e-4)


def _zero_run(reference, tmp_path, stage, launcher, *extra, run_name):
    """ZeRO ``stage`` on 2 ranks (2 micro-batches per rank) against the one-process run: trajectory
    and the consolidated weights of best.pt. Stages 1-2: float64 model, 1e-5 (fp32 master weights).
    Stage 3 partitions only fp32/bf16/fp16 parameters (a float64 model is a ConfigError): float32
    model against the float32 one-process run, 1e-4 (reduction order)."""
    dtype, rel = ("float32", 1e-4) if stage == 3 else ("float64", 1e-5)
    over = tiny_overrides(tmp_path, f"deepspeed.zero_stage={stage}", "memory.micro_batch_size=1", *extra,
                          dtype=dtype, run_name=run_name)
    args = [str(REPO / "train.py"), "--config", empty_config(tmp_path), *sets(over)]
    if launcher == "deepspeed":  # the DeepSpeed launcher on a CPU machine: --num_gpus 2 starts 2 gloo ranks
        cmd = DEEPSPEED + ["--num_gpus", "2", "--master_port", str(free_port()), *args]
    else:
        cmd = torchrun(*args)
    proc = launch(cmd, cwd=tmp_path)
    _check(proc)
    assert f"DeepSpeed ZeRO stage {stage}" in proc.stdout and f"launcher {launcher}" in proc.stdout
    assert "2 micro-batch(es)" in proc.stdout
    run = tmp_path / run_name
    assert (run / "deepspeed").is_dir() and (run / "results.json").is_file()
    _same_trajectory(reference / ("fp32" if dtype == "float32" else "fp64"), run, rel=rel)
    ck = torch.load(run / "best.pt", weights_only=True)  # consolidated weights, full shapes
    ref = torch.load(reference / ("fp32" if dtype == "float32" else "fp64") / "best.pt", weights_only=True)
    assert ck["model"].keys() == ref["model"].keys()
    for k in ref["model"]:
        assert ck["model"][k].shape == ref["model"][k].shape, k
        if ref["model"][k].is_floating_point() and stage < 3:
            torch.testing.assert_close(ck["model"][k], ref["model"][k], rtol=rel, atol=1e-7, msg=k)
    if stage == 3:  # float32: AdamW turns round-off in near-zero gradients into lr-sized steps of single
        # weights, so the weights are compared as a whole (relative L2 distance over all of them)
        keys = [k for k in ref["model"] if ref["model"][k].is_floating_point()]
        a = torch.cat([ck["model"][k].double().reshape(-1) for k in keys])
        b = torch.cat([ref["model"][k].double().reshape(-1) for k in keys])
        assert float((a - b).norm() / b.norm()) <= 1e-3
    return proc


@pytest.mark.parametrize("stage,launcher", [(1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_zero_stage_follows_one_process(reference, tmp_path, stage, launcher):
    _zero_run(reference, tmp_path, stage, launcher, run_name=f"zero{stage}")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_with_force_checkpointing_follows_one_process(reference, tmp_path, stage):
    """memory.checkpointing=forces (block-wise recomputation: a custom autograd Function that takes
    the parameters as inputs and differentiates a recomputed block in loss.backward()) under ZeRO-2
    (gradient hooks) and ZeRO-3 (parameters gathered per micro-step). The lever equals the plain
    path to 1e-10 in one process (test_memory_levers.py), so the plain one-process run is the reference."""
    proc = _zero_run(reference, tmp_path, stage, "torchrun", "memory.checkpointing=forces", run_name=f"forces{stage}")
    assert "checkpointing=forces" in proc.stdout


RESUME_SCRIPT = textwrap.dedent("""
    import sys, json
    from scalable_equiformer.config import load_config
    from scalable_equiformer.training import run
    overrides, resume, stop = json.loads(sys.argv[1]), sys.argv[2] or None, int(sys.argv[3]) or None
    run(load_config(None, overrides), resume=resume, stop_after_epochs=stop)
""")


def test_zero3_checkpoint_round_trip(tmp_path):
    """ZeRO-3 interrupted after 1 of 3 epochs and resumed equals the uninterrupted ZeRO-3 run."""
    import json

    script = tmp_path / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    common = ("deepspeed.zero_stage=3", "train.ema_decay=0.8", "train.log_every=1")
    full = tiny_overrides(tmp_path, *common, epochs=3, dtype="float32", run_name="full")
    part = tiny_overrides(tmp_path, *common, epochs=3, dtype="float32", run_name="part")
    _check(launch(torchrun(str(script), json.dumps(full), "", "0"), cwd=tmp_path))
    _check(launch(torchrun(str(script), json.dumps(part), "", "1"), cwd=tmp_path))
    assert len(epoch_rows(tmp_path / "part")) == 1 and not (tmp_path / "part" / "results.json").exists()
    assert [p.name for p in (tmp_path / "part" / "deepspeed").iterdir() if p.is_dir()] == ["epoch00001"]
    _check(launch(torchrun(str(script), json.dumps(part), str(tmp_path / "part"), "0"), cwd=tmp_path))
    _same_trajectory(tmp_path / "full", tmp_path / "part", rel=1e-10)
    assert results(tmp_path / "part")["test_force_mae_meV_per_A"] == pytest.approx(
        results(tmp_path / "full")["test_force_mae_meV_per_A"], rel=1e-10)


def test_deepspeed_config_from_typed_config():
    from scalable_equiformer.config import load_config
    from scalable_equiformer.training.batches import BatchPlan
    from scalable_equiformer.training.engine import deepspeed_config

    cfg = load_config(None, ["data.path=x", "train.batch_size=8", "memory.micro_batch_size=2", "train.grad_clip=10",
                             "deepspeed.zero_stage=3", "memory.precision=bf16",
                             'deepspeed.extra={"zero_optimization": {"overlap_comm": true}, '
                             '"flops_profiler": {"enabled": false}}'])
    plan = BatchPlan.from_config(cfg, dp_world=2)
    assert (plan.micro_batch_size, plan.grad_accum) == (2, 2)
    ds = deepspeed_config(cfg, plan, world_size=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 10.0
    assert ds["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False, "overlap_comm": True}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["flops_profiler"] == {"enabled": False}
    assert "optimizer" not in ds  # a client torch.optim.AdamW, never DeepSpeed's compiled one
    # gradient buckets sized by the model (DeepSpeed's default 5e8 elements is a 1.9 GiB buffer per backward)
    for stage, sized in ((0, False), (1, True), (2, True), (3, True)):
        c = load_config(None, ["data.path=x", f"deepspeed.zero_stage={stage}"])
        # the paper model's count, 3,496,001, is odd: ZeRO-1/2 assert the allgather bucket is a multiple of 2
        zero = deepspeed_config(c, BatchPlan.from_config(c, 2), 2, num_params=3_496_001)["zero_optimization"]
        assert ("reduce_bucket_size" in zero) == sized, stage
        if sized:
            assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 3_496_002
            small = deepspeed_config(c, BatchPlan.from_config(c, 2), 2, num_params=8_000)["zero_optimization"]
            assert small["reduce_bucket_size"] == 1 << 20
    from scalable_equiformer.errors import ConfigError

    with pytest.raises(ConfigError, match="must divide"):
        BatchPlan.from_config(load_config(None, ["data.path=x", "train.batch_size=8", "memory.micro_batch_size=3"]), 2)
    with pytest.raises(ConfigError, match="multiple of the data-parallel ranks"):
        BatchPlan.from_config(load_config(None, ["data.path=x", "train.batch_size=5"]), 2)
