"""Exponential moving average of a model's weights, kept in fp32 beside the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weights` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, shadow in self.model.state_dict().items():
            value = current[name].detach()
            if shadow.dtype.is_floating_point:
                shadow.lerp_(value.to(shadow.dtype), 1 - self.decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
