"""Image grids with their prompts written beside each row, and one PNG per image."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

LABEL_WIDTH = 260  # pixels of text column left of each row
_PAD = 2


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def labelled_grid(images: torch.Tensor, labels: Sequence[str], per_row: int) -> Image.Image:
    """Rows of `per_row` images (B = len(labels) * per_row), each row headed by its label."""
    if len(images) != len(labels) * per_row:
        raise ValueError(f"{len(images)} images do not fill {len(labels)} rows of {per_row}")
    pixels = to_uint8(images)
    h, w = pixels.shape[1:3]
    cell_h = max(h, 24)
    canvas = Image.new("RGB", (LABEL_WIDTH + per_row * (w + _PAD), len(labels) * (cell_h + _PAD)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(labels):
        top = row * (cell_h + _PAD)
        text = "\n".join(textwrap.wrap(label, width=LABEL_WIDTH // 6)[: max(1, cell_h // 11)])
        draw.multiline_text((4, top + 2), text, fill="black", spacing=1)
        for col in range(per_row):
            canvas.paste(Image.fromarray(pixels[row * per_row + col]),
                         (LABEL_WIDTH + col * (w + _PAD), top))
    return canvas


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def save_each(images: torch.Tensor, names: Sequence[str], folder: Path) -> list[Path]:
    """One PNG per image, `folder/<name>.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for pixels, name in zip(to_uint8(images), names):
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
