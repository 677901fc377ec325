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
    from scalable_equiformer.profiling.profiler import cuda_index

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


@pytest.mark.parametrize("strategy,chunk", [("autograd", None), ("blocks", None), ("forces", None), ("forces", 60)])
def test_bf16_step_under_cuda_autocast_rules(strategy, chunk):
    """A bf16 training step (forces with create_graph, loss.backward) with CUDA autocast's op lists:
    no dtype mix anywhere (forward, force graph, checkpoint recomputations), and within the stated
    bf16 tolerance of fp32 (nn/precision.py)."""
    import numpy as np

    from helpers.cuda_autocast import cuda_autocast_policy
    from scalable_equiformer.nn.forces import energy_and_forces
    from scalable_equiformer.nn.precision import autocast
    from scalable_equiformer.parallel import check as C
    from scalable_equiformer.profiling.stepper import make_batch
    from scalable_equiformer.training.trainer import PACKAGE_DIR

    with np.load(PACKAGE_DIR / "demo_data" / "aspirin_xtb_500K.npz") as d:
        z, R = d["z"], d["R"][:2]
    model = C.build_checked_model(C.tiny_model_config(dtype="float32", irreps_node="32x0e+16x1e+8x2e",
                                                      irreps_head="8x0e+4x1e+2x2e",
                                                      irreps_feedforward="64x0e+32x1e+16x2e",
                                                      irreps_feature="32x0e"), seed=0).train()
    batch = make_batch(z, R, torch.float32, "cpu")

    def step(precision, policy):
        model.zero_grad(set_to_none=True)
        model.edge_chunk_size = chunk
        with policy() as hits:
            with autocast(precision, "cpu"):
                out = energy_and_forces(model, batch, training=True,
                                        strategy=strategy if precision != "fp32" else "autograd")
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
