"""Mixed precision from one string: the autocast context and whether a GradScaler is needed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA and fp32 on CPU (bf16 matmuls run ~100x slower on our CPUs)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return precision


def fast_fp32_math(device: torch.device) -> None:
    """The fastest fp32 arithmetic that keeps training's results.

    On CUDA, fp32 matmuls and convolutions (the fp32 logits and losses, precision=fp32 runs) use
    TF32 tensor cores: ~8x the fp32 rate on A100/H100 for a 10-bit mantissa. On the CPU, denormal
    floats (below 1.2e-38: tiny gradients and Adam moments late in training) are flushed to zero:
    x86 handles them in microcode, which made the demo's stage 1 ~25% slower after 100 steps.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_flush_denormal(True)


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A zero-argument factory of the autocast context for this precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
