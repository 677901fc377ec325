"""What would break on a GPU but has a cause that a CPU can check (issue 14, point 3).

* DeepSpeed's accelerator follows the training device (``runtime.deepspeed_accelerator``), and the
  process-group backend is nccl for CUDA, gloo for the CPU.
* The profiler's partition ranks share the GPUs round robin (rank 1 of 2 on a one-GPU machine is
  on GPU 0, not on a GPU 1 that does not exist).
* bf16 under CUDA autocast's op lists (``tests/helpers/cuda_autocast.py`` applies them on the
  CPU): CUDA runs exp, pow, sum, softmax, norms, layer_norm ... in fp32 where the CPU keeps bf16,
  and a model that mixes the two (a bf16 buffer receiving an fp32 ``index_add``) fails only on the
  GPU. The model's bf16 step (plain, per-block checkpointing, force-aware, edge chunks) runs under
  those rules within the stated tolerance.
* DeepSpeed ZeRO-2's gradient bucket is sized by the model: its default (5e8 elements, a 1.9 GiB
  fp32 buffer allocated in every backward) would sit in every GPU's peak next to the activations.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from scalable_equiformer import runtime
from scalable_equiformer.errors import ConfigError


def test_deepspeed_accelerator_follows_the_device(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delitem(sys.modules, "deepspeed.accelerator.real_accelerator", raising=False)
    assert runtime.deepspeed_accelerator(torch.device("cuda", 0)) == "cuda"
    import os

    assert os.environ["DS_ACCELERATOR"] == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # left over from a CPU job, then a GPU run
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu .* runs on cuda:0"):
        runtime.deepspeed_accelerator(torch.device("cuda", 0))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert runtime.deepspeed_accelerator(torch.device("cpu")) == "cpu"


def test_deepspeed_accelerator_already_chosen_in_this_process(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    fake = types.SimpleNamespace(ds_accelerator=types.SimpleNamespace(device_name=lambda: "cuda"))
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator.real_accelerator", fake)
    with pytest.raises(ConfigError, match="already chose its cuda accelerator"):
        runtime.deepspeed_accelerator(torch.device("cpu"))
    assert runtime.deepspeed_accelerator(torch.device("cuda")) == "cuda"


def test_backend_is_nccl_for_cuda_and_gloo_for_cpu(monkeypatch):
    for env in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(runtime, "select_device", lambda name, local_rank=0: torch.device("cuda", 0))
    info, device = runtime.init_distributed(use_deepspeed=False, device_name="cuda")
    assert (info.backend, device.type, info.initialized) == ("nccl", "cuda", False)  # one process: no group
    monkeypatch.setattr(runtime, "select_device", lambda name, local_rank=0: torch.device("cpu"))
    info, _ = runtime.init_distributed(use_deepspeed=False, device_name="cpu")
    assert info.backend == "gloo"


def test_profiler_ranks_share_the_gpus():
    from scalable_equiformer.runtime import cuda_index

    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [cuda_index(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert cuda_index(3, 8) == 3


# ---- CUDA autocast's op lists, emulated on the CPU ------------------------------------------------


def test_cuda_autocast_emulation_catches_a_dtype_mix_that_cpu_autocast_hides():
    """The helper's point: under CUDA autocast ``exp`` of bf16 is fp32, and an ``index_add`` of it
    into a bf16 buffer fails; CPU autocast keeps it bf16 and runs."""
    from helpers.cuda_autocast import cuda_autocast_policy

    def scatter_exp(x, idx):
        return x.new_zeros(3).index_add(0, idx, torch.exp(x))

    w = torch.randn(4, 4)
    idx = torch.tensor([0, 1, 1, 2])
    exp, tensor_exp = torch.exp, torch.Tensor.exp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scatter_exp(torch.ones(4) @ w, idx).dtype == torch.bfloat16
    with cuda_autocast_policy() as hits, torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="same"):
            scatter_exp(torch.ones(4) @ w, idx)
    assert hits == {"exp": 1}
    assert torch.exp is exp and torch.Tensor.exp is tensor_exp  # restored


@pytest.mark.parametrize("strategy,chunk", [("none", None), ("blocks", None), ("forces", None), ("forces", 60)])
def test_bf16_step_under_cuda_autocast_rules(strategy, chunk):
    """A bf16 training step (forces with create_graph, loss.backward) with CUDA autocast's op lists:
    no dtype mix anywhere (forward, force graph, checkpoint recomputations), and within the stated
    bf16 tolerance of fp32 (nn/precision.py)."""
    import numpy as np

    from helpers.cuda_autocast import cuda_autocast_policy
    from scalable_equiformer.memory import ForceRunner, Levers
    from scalable_equiformer.memory.precision import autocast
    import partition_harness as C
    from scalable_equiformer.profiling.measured_step import make_batch
    from scalable_equiformer.data.dataset import PACKAGE_DIR

    with np.load(PACKAGE_DIR / "demo_data" / "aspirin_xtb_500K.npz") as d:
        z, R = d["z"], d["R"][:2]
    model = C.build_checked_model(C.tiny_model_config(dtype="float32", irreps_node="32x0e+16x1e+8x2e",
                                                      irreps_head="8x0e+4x1e+2x2e",
                                                      irreps_feedforward="64x0e+32x1e+16x2e",
                                                      irreps_feature="32x0e"), seed=0).train()
    batch = make_batch(z, R, torch.float32, "cpu")

    def step(precision, policy):
        model.zero_grad(set_to_none=True)
        levers = Levers(strategy, edge_chunk_size=chunk) if precision != "fp32" else Levers()
        with policy() as hits:
            with autocast(precision, "cpu"):
                out = ForceRunner(levers)(model, batch, training=True)
            loss = out["energy"].sum() + out["forces"].float().pow(2).sum()
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out["forces"].detach(), grads, hits

    import contextlib

    f32, g32, _ = step("fp32", lambda: contextlib.nullcontext({}))
    f16, g16, hits = step("bf16", cuda_autocast_policy)
    assert hits, "the CUDA rules cast nothing: the emulation is not reaching the model"
    assert f16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert float((f16 - f32).norm() / f32.norm()) < 0.05
    assert float((g16 - g32).norm() / g32.norm()) < 0.10


ZERO_STEP = r"""
import os, sys
import numpy as np
import torch
stage, dtype = int(sys.argv[1]), sys.argv[2]
big = []
_empty = torch.empty
def empty(*a, **k):
    t = _empty(*a, **k)
    if t.numel() > 4 << 20:
        big.append(t.numel())
    return t
torch.empty = empty
from scalable_equiformer import runtime
from scalable_equiformer.config import load_config
import partition_harness as C
from scalable_equiformer.profiling import measured_step
from scalable_equiformer.training.batches import BatchPlan
from scalable_equiformer.training.engine import DeepSpeedEngine
from scalable_equiformer.training.steps import compute_loss
from scalable_equiformer.data.dataset import PACKAGE_DIR
cfg = load_config(None, ["data.name=x", f"deepspeed.zero_stage={stage}", "train.batch_size=2", "train.device=cpu",
                         f"model.dtype={dtype}"] + [f"model.{k}={v}" for k, v in C.tiny_model().items()])
info, dev = runtime.init_distributed(True, "cpu")
model, dtype = measured_step.build(cfg, dev, 21)
eng = DeepSpeedEngine(model, cfg, BatchPlan.from_config(cfg, 1), 1)
with np.load(PACKAGE_DIR / "demo_data" / "aspirin_xtb_500K.npz") as d:
    batch = measured_step.make_batch(d["z"], d["R"][:2], dtype, dev)
with eng.micro_context():
    out = eng.micro_step(batch)
    eng.backward(compute_loss(out, batch, cfg, 1.0, 2.0, 42.0))
eng.step(1e-4)
dtypes = sorted({str(p.dtype) for p in eng.module.parameters()})
print("RESULT", getattr(eng.optimizer, "reduce_bucket_size", 0), big, dtypes)
runtime.shutdown_distributed()
"""


def _zero_step(tmp_path, stage, dtype):
    import os
    import subprocess

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, and the script
    tools = os.path.join(root, "tools")  # imports partition_harness
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, tools, env.get("PYTHONPATH")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", ZERO_STEP, str(stage), dtype],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    return line


@pytest.mark.slow
def test_zero2_step_allocates_no_default_sized_bucket(tmp_path):
    """A ZeRO-2 step of a tiny model (one process, gloo): no tensor of DeepSpeed's default bucket
    size is allocated (before: one of 5e8 fp32 elements per backward)."""
    line = _zero_step(tmp_path, 2, "float32")
    assert line == "RESULT 1048576 [] ['torch.float32']", line


@pytest.mark.slow
def test_zero3_step_allocates_no_default_sized_bucket(tmp_path):
    line = _zero_step(tmp_path, 3, "float32")
    assert line == "RESULT 1048576 [] ['torch.float32']", line
