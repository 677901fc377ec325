"""The memory levers, from the config to the kernels: one frozen :class:`Levers` value
(:mod:`.levers`), the force runner built from it (:mod:`.runner`), the force-aware
recomputation it runs (:mod:`.force_checkpoint`) and the precision switch (:mod:`.precision`).

Imports go one way: ``config`` -> ``memory`` -> ``nn`` (the blocks know no lever); the
graph-partitioned model (``parallel/``) is handed a runner and imports nothing from here.
"""

from .levers import CHECKPOINTING, LeverError, Levers
from .precision import PRECISIONS, autocast, low_dtype
from .runner import ForceRunner, LeveredModel, ModelStages, with_levers

__all__ = ["CHECKPOINTING", "ForceRunner", "LeverError", "LeveredModel", "Levers", "ModelStages", "PRECISIONS",
           "autocast", "low_dtype", "with_levers"]
