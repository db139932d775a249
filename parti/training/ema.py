"""Exponential moving average of a model's weights, kept in fp32 beside the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weights` after every optimizer step.

    Only parameters are averaged. Buffers are copied: they are statistics, counters and rings
    (e.g. the quantizer's usage window and dead-code counts), whose average means nothing.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, shadow in self.model.named_parameters():
            shadow.lerp_(params[name].detach().to(shadow.dtype), 1 - self.decay)
        buffers = dict(model.named_buffers())
        for name, shadow in self.model.named_buffers():
            shadow.copy_(buffers[name])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
