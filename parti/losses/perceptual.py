"""LPIPS perceptual distance with a backbone read from a local file, never downloaded.

`lpips.LPIPS` is always built with a randomly initialised backbone (`pnet_rand=True`, so
torchvision downloads nothing); its linear heads come from files shipped inside the lpips package.
For "alex"/"vgg" the backbone weights are then loaded from a local torchvision state_dict.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import lpips

BACKBONES = ("random", "alex", "vgg")
# Seed of the "random" backbone: the same network on every rank and in every run.
_RANDOM_BACKBONE_SEED = 0


class Perceptual(nn.Module):
    """A frozen LPIPS network that stays in eval mode (its heads' dropout never switches on)."""

    def __init__(self, net: lpips.LPIPS):
        super().__init__()
        self.net = net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Perceptual:
        """Ignore train(): the network is frozen and must stay deterministic."""
        return self

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W >= 32 -> LPIPS distance (B,)."""
        return self.net(a, b).flatten()


def _missing_weights_message(backbone: str) -> str:
    tv = "alexnet" if backbone == "alex" else "vgg16"
    enum = "AlexNet_Weights" if backbone == "alex" else "VGG16_Weights"
    return (
        f"perceptual_backbone={backbone!r} needs local backbone weights: set "
        f"loss.perceptual_weights=/path/to/{tv}.pth (a torchvision {tv} state_dict, made once on a "
        f'machine with internet by: python -c "import torch, torchvision; torch.save('
        f"torchvision.models.{tv}(weights=torchvision.models.{enum}.IMAGENET1K_V1)"
        f".state_dict(), '{tv}.pth')\"), "
        f"or use loss.perceptual_backbone=random. Nothing is downloaded at run time."
    )


def _load_backbone(net: nn.Module, path: Path) -> None:
    """Copy torchvision `features.N.*` (or features-only `N.*`) tensors into lpips' `sliceK.N.*`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    mapped, missing = {}, []
    for key, param in net.state_dict().items():
        layer_key = key.split(".", 1)[1]  # "slice2.3.weight" -> "3.weight"
        value = state.get(f"features.{layer_key}", state.get(layer_key))
        if value is None:
            missing.append(f"features.{layer_key}")
        elif value.shape != param.shape:
            raise ValueError(
                f"{path}: features.{layer_key} has shape {tuple(value.shape)}, the "
                f"backbone needs {tuple(param.shape)}: wrong network?"
            )
        else:
            mapped[key] = value
    if missing:
        raise ValueError(
            f"{path} lacks backbone tensors {missing[:4]}...: is it a torchvision "
            f"state_dict of the right network?"
        )
    net.load_state_dict(mapped)


def build_perceptual(backbone: str, weights_path: str | None) -> Perceptual:
    """LPIPS on a "random" (seeded) backbone for tests/demos, or "alex"/"vgg" from a local file."""
    if backbone not in BACKBONES:
        raise ValueError(f"perceptual_backbone={backbone!r} is not one of {BACKBONES}")
    if backbone != "random":
        if not weights_path:
            raise ValueError(_missing_weights_message(backbone))
        if not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"perceptual_weights={weights_path!r} does not exist. "
                + _missing_weights_message(backbone)
            )
    import lpips  # here, not at import: with torchvision it adds ~2 s to every process's start

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # lpips passes torchvision's deprecated `pretrained=False`; harmless, and not ours to fix.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(_RANDOM_BACKBONE_SEED)
        net = lpips.LPIPS(
            net="alex" if backbone == "random" else backbone,
            pretrained=True,  # the linear heads: files shipped inside the lpips package, no download
            pnet_rand=True,  # the backbone is never fetched: random, or loaded below from a local path
            verbose=False,
        )
    if backbone != "random":
        _load_backbone(net.net, Path(weights_path))
    return Perceptual(net)


@torch.no_grad()
def lpips_distance(module: Perceptual, a: Tensor, b: Tensor) -> Tensor:
    """LPIPS distance (B,) between image batches in [-1, 1], without gradients (for evaluation)."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"lpips_distance needs two (B, 3, H, W) batches, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    return module(a, b)
