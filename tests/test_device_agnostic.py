"""What would break on a GPU but has a cause that a CPU can check (issue 14, point 3).

* DeepSpeed's accelerator follows the training device (``runtime.deepspeed_accelerator``), and the
  process-group backend is nccl for CUDA, gloo for the CPU.
* The profiler's partition ranks share the GPUs round robin (rank 1 of 2 on a one-GPU machine is
  on GPU 0, not on a GPU 1 that does not exist).
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
