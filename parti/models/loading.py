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


def load_parti(path: str | Path, device: torch.device | str = "cpu"):
    """(Parti model, text tokenizer, image tokenizer) from a stage-2 export or checkpoint folder."""
    from parti.models.parti import Parti, PartiConfig
    from parti.text.tokenizer import TextTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"ckpt={path} does not exist: train stage 2 first (python train_parti.py; `make demo` "
            "writes outputs/demo/parti/export) and pass its export or checkpoints/step-N folder")
    weights, config = load_export(path)
    if config.get("kind") != "parti":
        raise ValueError(f"{path} holds a {config.get('kind')!r} model, not a parti model")
    schema = OmegaConf.structured(PartiConfig)
    model = Parti(OmegaConf.to_object(OmegaConf.merge(schema, config["model"])))
    model.load_state_dict(weights)
    model = model.to(device).eval().requires_grad_(False)
    text = TextTokenizer(config["text_tokenizer"])
    image = load_image_tokenizer(config["image_tokenizer"], device)
    return model, text, image
