"""Training: ``run(config, resume=None)`` trains, evaluates, checkpoints and writes the run folder.

Launch modes: ``python train.py``, ``torchrun --nproc_per_node N train.py``, ``deepspeed
[--num_gpus N] train.py`` (see :mod:`scalable_equiformer.runtime`).
"""

from .trainer import run

__all__ = ["run"]
