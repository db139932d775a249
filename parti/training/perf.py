"""Throughput bookkeeping: peak FLOP/s of the device (for MFU) and a windowed rate meter."""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, by a substring of the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                 "4090": 165e12, "3090": 71e12, "V100": 125e12}


def measured_matmul_flops(device: torch.device, size: int = 1024, seconds: float = 0.3) -> float:
    """Measured fp32 matmul rate (FLOP/s): the ceiling an fp32 CPU run can reach."""
    # Constant operands: drawing random ones would advance the global RNG and break exact resume.
    a = torch.full((size, size), 0.5, device=device)
    b = torch.full((size, size), 0.25, device=device)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def peak_flops(device: torch.device, configured: float) -> float:
    """`configured` if set; else the known bf16 peak of this GPU, else the measured matmul rate."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value
    return measured_matmul_flops(device)


class RateMeter:
    """Samples per second and seconds per step since the last `read()`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0
        self.steps = 0

    def add(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def read(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.samples / elapsed
        step_time = elapsed / max(self.steps, 1)
        self.start, self.samples, self.steps = time.perf_counter(), 0, 0
        return rate, step_time
