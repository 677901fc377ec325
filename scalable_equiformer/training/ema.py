"""Exponential moving average of the weights, used for evaluation when ``train.ema_decay`` is set.

``ema = decay * ema + (1 - decay) * w`` after every optimizer step, with the usual warm-up of the
decay (``min(decay, (1 + n) / (10 + n))`` after ``n`` updates) so early averages are not dominated
by the random initial weights. Only parameters are averaged; buffers (the normalisation
statistics) are taken from the live model.
"""

from __future__ import annotations

from typing import Mapping

import torch


class EMA:
    def __init__(self, state: Mapping[str, torch.Tensor], decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in state.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, state: Mapping[str, torch.Tensor]) -> None:
        d = self.current_decay()
        for k, v in state.items():
            self.shadow[k].mul_(d).add_(v.detach().to(self.shadow[k].dtype), alpha=1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints are read onto the CPU (``map_location="cpu"``): each average goes to the
        device and dtype of the weights it follows, or the first ``update`` on a GPU would mix
        devices."""
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            old = self.shadow.get(k)
            self.shadow[k] = v.to(device=old.device, dtype=old.dtype, copy=True) if old is not None else v.clone()


__all__ = ["EMA"]
