"""Rebuild a frozen stage-1 tokenizer from its export (or checkpoint) folder: the path is enough."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from parti.models.vitvqgan import VitVQGAN, VitVQGANConfig
from parti.training.checkpoint import load_export


def load_image_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> VitVQGAN:
    """The ViT-VQGAN stored at `path`, in eval mode with gradients off."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer.ckpt={path} does not exist. Train a tokenizer first (python train_vqgan.py; "
            "`make demo` writes outputs/demo/vqgan/export) and pass its <run>/export folder or a "
            "<run>/checkpoints/step-N folder")
    weights, config = load_export(path)
    if config.get("kind") != "vitvqgan":
        raise ValueError(f"{path} holds a {config.get('kind')!r} model, not a vitvqgan tokenizer")
    schema = OmegaConf.structured(VitVQGANConfig)
    model = VitVQGAN(OmegaConf.to_object(OmegaConf.merge(schema, config["model"])))
    model.load_state_dict(weights)
    return model.to(device).eval().requires_grad_(False)
