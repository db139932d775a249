"""Reconstruction metrics on images in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(images: Tensor, recon: Tensor) -> Tensor:
    """Per-image PSNR in dB on the [0, 1] pixel scale: (B,)."""
    mse = ((images.float() - recon.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def codebook_usage(counts: Tensor) -> tuple[float, float]:
    """(fraction of codes used, perplexity) from per-code counts (see `torch.bincount`)."""
    counts = counts.double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())
