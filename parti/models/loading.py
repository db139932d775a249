"""Rebuild trained models from their export (or checkpoint) folders: the path is enough."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from parti.distributed.checkpoint import load_export
from parti.models.parti import Parti, PartiConfig
from parti.models.vitvqgan import VitVQGAN, VitVQGANConfig
from parti.text.tokenizer import TextTokenizer

VALID_FOLDER = ("A model folder is a run's export/ (model.safetensors + config.yaml) or one of its "
                "checkpoints/step-N/ (state.pt + COMPLETE).")


def _load(path: Path, kind: str, schema: type, build: type[nn.Module], device, how: str):
    """The `kind` model stored at `path`, in eval mode with gradients off, and its export config."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. {VALID_FOLDER} {how}")
    weights, config = load_export(path)
    if config.get("kind") != kind:
        raise ValueError(f"{path} holds a {config.get('kind')!r} model, not a {kind} model. "
                         f"{how}")
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), config["model"]))
    model = build(model_cfg)
    model.load_state_dict(weights)
    return model.to(device).eval().requires_grad_(False), config


def load_image_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> VitVQGAN:
    """The frozen stage-1 ViT-VQGAN of an export or checkpoint folder."""
    how = ("Train a tokenizer first (python train_vqgan.py experiment=demo_vqgan writes "
           "outputs/demo/vqgan/export) and pass its <run>/export folder or a "
           "<run>/checkpoints/step-N folder")
    return _load(Path(path), "vitvqgan", VitVQGANConfig, VitVQGAN, device, how)[0]


def load_parti(path: str | Path, device: torch.device | str = "cpu"):
    """(Parti model, text tokenizer, image tokenizer) from a stage-2 export or checkpoint folder."""
    how = ("Train stage 2 first (python train_parti.py experiment=demo_parti writes "
           "outputs/demo/parti/export) and pass its export or checkpoints/step-N folder")
    model, config = _load(Path(path), "parti", PartiConfig, Parti, device, how)
    return model, TextTokenizer(config["text_tokenizer"]), load_image_tokenizer(
        config["image_tokenizer"], device)
