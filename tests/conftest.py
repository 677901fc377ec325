"""Suite-wide settings. One torch thread per process: the multi-rank tests start several
processes on a 2-core machine, and oversubscribed threads made a tiny step ~100x slower."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the processes tests spawn

import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn and probe for GPUs
