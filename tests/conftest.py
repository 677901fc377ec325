"""Suite-wide settings. One torch thread per process: the multi-rank tests start several
processes on a 2-core machine, and oversubscribed threads made a tiny step ~100x slower.

``--device cpu|cuda`` (default cpu): where the ``gpu_equivalence`` tests put their tensors
(``tests/test_device_equivalence.py``; ``benchmarks/gpu/run.sh`` runs them with ``--device cuda``).
``tools/`` is on ``sys.path`` (last): tests import the partition harness as ``partition_harness``.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the processes tests spawn
# the partition harness, tools/partition_harness.py (appended: tools' script names shadow nothing)
sys.path.append(str(Path(__file__).resolve().parent.parent / "tools"))

import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn and probe for GPUs


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="device of the gpu_equivalence tests' tensors (default cpu)")


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: CUDA is not available on this machine")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device that ``--device`` names (the ``gpu_equivalence`` tests run on it)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def atat_checkpoint(tmp_path_factory):
    """``best.pt`` of the tiny fp64 model trained through train.py on the shipped AT-AT frames
    (the MD-engine tests share it: one training per session)."""
    from helpers.md import train_atat_checkpoint

    return train_atat_checkpoint(tmp_path_factory.mktemp("md_run"))
