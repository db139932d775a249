"""Optimizers and learning-rate schedules from the `optim` config group."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases, norms or 1-D parameters (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def multi_tensor_kernels(params: list[torch.Tensor]) -> dict[str, bool]:
    """{"fused": True} when every parameter is a float tensor on the CPU or a CUDA device, plain or
    a DTensor shard under FSDP (one kernel updates them all, and it can skip an update on the
    device: `found_inf`), else {"foreach": True}.

    The default would loop over the parameters one by one on the CPU: several small ops each.
    """
    floats = all(p.is_floating_point() for p in params)
    if floats and {p.device.type for p in params} <= {"cpu", "cuda"}:
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Adam, AdamW, Adafactor or SGD over `model`'s trainable parameters. AdamW and Adafactor
    decay the weights directly (decoupled); Adam and SGD add the decay to the gradient (L2).

    torch's Adafactor keeps no first moment and uses its own beta2 schedule, so `optim.betas` does
    not apply to it (the `eps` value is its relative step floor, eps2). SGD takes its momentum
    from betas[0] (0: plain SGD, whose update is linear in the gradient: the reference for exact
    multi-rank equivalence tests). Adam and AdamW take the fused (or foreach) kernels.
    """
    groups = param_groups(model, cfg.weight_decay)
    kernels = multi_tensor_kernels([p for g in groups for p in g["params"]])
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernels)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 **kernels)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr, eps=(None, cfg.eps))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0])
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")


def lr_factor(cfg, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warm-up, then the configured decay.

    constant: 1 after warm-up. cosine: from 1 down to final_lr_ratio at step total_steps (the
    end of the run: its last update, at step total_steps - 1, is one step short of it).
    parti: 1 until decay_start, then exponential decay reaching final_lr_ratio at total_steps.
    """
    warmup, final = cfg.warmup_steps, cfg.final_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            span = max(1, total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        start = max(warmup, cfg.decay_start)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return final**progress

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """A LambdaLR stepping once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
