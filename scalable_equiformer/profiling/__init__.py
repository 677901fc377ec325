"""Memory profiling: measure a training step's peak (``profiler``), estimate it (``estimate``),
and plan the levers that fit a GPU (``planner``); the one peak-memory meter (``meter``).
``tools/memory_profile.py`` is the command line.

The profiler sits above training: it runs the trainer's own step (``measured_step``) on real or
synthetic molecules (``systems``).
"""

from ..memory.levers import Levers
from .estimate import Estimate, activation_profile, model_states
from .planner import Plan, parse_bytes, plan
from .profiler import ProfileError, Request, measure

__all__ = ["Estimate", "Levers", "Plan", "ProfileError", "Request", "activation_profile", "measure",
           "model_states", "parse_bytes", "plan"]
