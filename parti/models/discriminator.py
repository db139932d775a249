"""StyleGAN2-style residual discriminator: one logit per image, for square power-of-two images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parti.config_errors import check_config


@dataclass
class DiscriminatorConfig:
    channels: int = 64  # width of the first conv, doubled per downsampling
    max_channels: int = 256  # width cap of the deeper blocks
    mbstd_group: int = 4  # minibatch-std group size (1 = off); shrunk to a divisor of the batch


def validate(cfg: DiscriminatorConfig | Any, prefix: str = "model.disc.") -> None:
    """Reject impossible discriminator values with a message naming the key."""
    check_config(cfg.channels >= 1, f"{prefix}channels", f"{cfg.channels} must be >= 1")
    check_config(
        cfg.max_channels >= cfg.channels,
        f"{prefix}max_channels",
        f"{cfg.max_channels} must be >= channels ({cfg.channels})",
    )
    check_config(
        cfg.mbstd_group >= 1, f"{prefix}mbstd_group", f"{cfg.mbstd_group} must be >= 1 (1 = off)"
    )


def validate_image_size(image_size: int, key: str = "model.image_size") -> None:
    """The discriminator halves the image down to 4x4: the size must be a power of two >= 8."""
    check_config(
        image_size >= 8 and image_size & (image_size - 1) == 0,
        key,
        f"{image_size} must be a power of two >= 8 (the discriminator halves it down to 4x4)",
    )


class DiscriminatorBlock(nn.Module):
    """conv3x3 -> lrelu -> conv3x3 -> lrelu -> downsample, plus a 1x1-conv skip; sum / sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


def minibatch_std(x: Tensor, group: int) -> Tensor:
    """Append one channel: the mean std of the features over groups of samples (StyleGAN).

    The group is the largest divisor of the batch not above `group`, so any batch size works.
    """
    b, _, h, w = x.shape
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    y = x.float().view(g, b // g, *x.shape[1:])  # (G, M, C, H, W): sample m + i*M is in group m
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (M, C, H, W)
    feat = std.mean(dim=(1, 2, 3)).repeat(g).to(x.dtype)  # (B,)
    return torch.cat([x, feat.view(b, 1, 1, 1).expand(b, 1, h, w)], dim=1)


class Discriminator(nn.Module):
    """fromRGB 1x1 conv, residual downsampling blocks to 4x4, minibatch std, conv, two linears."""

    def __init__(self, cfg: DiscriminatorConfig, image_size: int, channels: int = 3):
        super().__init__()
        validate(cfg)
        validate_image_size(image_size, "image_size")
        self.mbstd_group = cfg.mbstd_group
        n_blocks = int(math.log2(image_size)) - 2
        widths = [min(cfg.channels * 2**i, cfg.max_channels) for i in range(n_blocks + 1)]
        self.from_rgb = nn.Conv2d(channels, widths[0], 1)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(widths[i], widths[i + 1]) for i in range(n_blocks)
        )
        top = widths[-1]
        extra = 1 if cfg.mbstd_group > 1 else 0
        self.conv = nn.Conv2d(top + extra, top, 3, padding=1)
        self.fc = nn.Linear(top * 4 * 4, top)
        self.out = nn.Linear(top, 1)
        self.image_size = image_size

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [-1, 1] -> logits (B,); higher means 'real'."""
        if images.ndim != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"discriminator expects (B, C, {self.image_size}, {self.image_size}) "
                f"images, got {tuple(images.shape)}"
            )
        x = F.leaky_relu(self.from_rgb(images), 0.2)
        for block in self.blocks:
            x = block(x)
        if self.mbstd_group > 1:
            x = minibatch_std(x, self.mbstd_group)
        x = F.leaky_relu(self.conv(x), 0.2)  # (B, C, 4, 4)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)  # (B, C)
        return self.out(x).squeeze(1)
