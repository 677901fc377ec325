"""Learning rate per optimizer step: linear warm-up, then cosine decay to a floor.

The paper's recipe in epochs (10 warm-up epochs from ``warmup_lr``, cosine to ``min_lr``) is
evaluated per step, so the rate changes smoothly inside an epoch::

    step < W:   lr(step) = warmup_lr + (lr - warmup_lr) * step / W
    step >= W:  lr(step) = min_lr + (lr - min_lr) * (1 + cos(pi * (step - W) / (T - W))) / 2

with ``W = warmup_epochs * steps_per_epoch`` and ``T`` the run's total steps (``max_epochs *
steps_per_epoch``, or ``train.max_steps`` when that is smaller). ``constant`` keeps ``lr`` after the
warm-up. It is a pure function of the step, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"  # cosine | constant

    @classmethod
    def from_config(cls, optim, steps_per_epoch: int, total_steps: int) -> "LRSchedule":
        warmup = int(round(optim.warmup_epochs * steps_per_epoch))
        return cls(optim.lr, optim.warmup_lr, optim.min_lr, min(warmup, total_steps), max(total_steps, 1),
                   optim.scheduler)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0), span) / span
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


__all__ = ["LRSchedule"]
