"""Exponential moving average of a model's weights, as a full eval-mode copy (used for sampling)."""

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, every: int = 1, start: int = 0):
        self.decay = decay
        self.every = every
        self.start = start
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after the optimizer step that produced `step` (1-based count of updates)."""
        if step % self.every:
            return
        decay = 0.0 if step <= self.start else self.decay
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(source[name].to(value.dtype), 1.0 - decay)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
