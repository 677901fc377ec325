"""Equiformer interatomic potential with memory levers for large molecules."""

from .config import Config, load_config
from .errors import CheckpointError, ConfigError, DataError, TrainingError, UserError
from .model import build_model
