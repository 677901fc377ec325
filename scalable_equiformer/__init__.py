"""Equiformer interatomic potential with memory levers for large molecules.

``Config``, ``load_config`` and ``build_model`` are imported on first use (PEP 562): importing the
package (or a light module in it, e.g. the openmm-ml entry point that ``import openmmml`` loads)
does not import torch.
"""

from .errors import CheckpointError, ConfigError, DataError, TrainingError, UserError
from ._lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {"Config": "config", "load_config": "config", "build_model": "model"})

__all__ = ["Config", "load_config", "build_model", "CheckpointError", "ConfigError", "DataError", "TrainingError",
           "UserError"]
