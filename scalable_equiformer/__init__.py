"""Equiformer interatomic potential with memory levers for large molecules.

``Config``, ``load_config`` and ``build_model`` are imported on first use (PEP 562): importing the
package (or a light module in it, e.g. the openmm-ml entry point that ``import openmmml`` loads)
does not import torch.
"""

from .errors import CheckpointError, ConfigError, DataError, TrainingError, UserError

_LAZY = {"Config": "config", "load_config": "config", "build_model": "model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Config", "load_config", "build_model", "CheckpointError", "ConfigError", "DataError", "TrainingError",
           "UserError"]
