"""Errors a user can act on. Each message is one line that names the file or key and the problem.

Entry points (``train.py``, ``tools/*``) catch :class:`UserError` and print ``error: <message>``
without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config, a data file, a checkpoint, a command-line flag."""


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an impossible value in a config (file or ``--set``)."""


class DataError(UserError, ValueError):
    """A data file that is missing, unreadable or inconsistent."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, corrupt, or from another model configuration."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""
