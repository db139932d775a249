"""Exponential moving average of a model's weights, kept beside the model in its own layout."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weights` after every optimizer step.

    The shadow copies each parameter as it is held, so under FSDP every rank averages only its own
    shard (sharded EMA, no communication). Only parameters are averaged. Buffers are copied: they
    are statistics, counters and rings (e.g. the quantizer's usage window), whose average means
    nothing. `state_dict` has the model's own keys, so it loads into the model for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.keys = list(model.state_dict())
        copies: dict[int, Tensor] = {}  # tied weights (one tensor, two names) share one shadow
        self.params = {n: copies.setdefault(id(p), p.detach().clone())
                       for n, p in model.named_parameters(remove_duplicate=False)}
        self.buffers = {n: copies.setdefault(id(b), b.detach().clone())
                        for n, b in model.named_buffers(remove_duplicate=False)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            self.params[name].lerp_(param.detach(), 1 - self.decay)
        for name, buffer in model.named_buffers():
            self.buffers[name].copy_(buffer)

    def state_dict(self) -> dict[str, Tensor]:
        merged = {**self.params, **self.buffers}
        return {key: merged[key] for key in self.keys}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.keys) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for name, tensor in {**self.params, **self.buffers}.items():
            if name in state:
                tensor.copy_(state[name])
