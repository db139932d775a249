"""FID of generated images against held-out images, with Inception-v3 weights read from a local file.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to Inception-v3 pool
features of two image sets: 0 for identical feature statistics, larger the further apart. The
features and the distance come from torchmetrics' `FrechetInceptionDistance` (torch-fidelity's
TF-compatible Inception-v3), never re-implemented here. torch-fidelity downloads its weights only
when no path is given; `fid` always passes a path (`eval.fid_weights`) and refuses a missing one,
so nothing is ever downloaded. `random_inception_weights` writes a seeded random network for tests
and smoke runs (its scores only compare runs scored with the same file; they are not real FIDs).

    score = fid(real, fake, weights_path="/weights/weights-inception-2015-12-05-6726825d.pth")
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image.fid import FrechetInceptionDistance


def _missing_weights_message(weights_path: str | Path | None, key: str) -> str:
    return (
        f"FID needs local Inception-v3 weights, got {key}={weights_path!r}, which is not "
        f"a file. Set {key}=/path/to/weights-inception-2015-12-05-6726825d.pth: the "
        f"torch-fidelity/torchmetrics Inception-v3 FID state_dict (pytorch-fid's "
        f"pt_inception-2015-12-05-6726825d.pth is the same network), or for a smoke run a random "
        f"one from parti.eval.fid.random_inception_weights. Nothing is downloaded."
    )


def fid(
    real: Tensor,
    fake: Tensor,
    weights_path: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    feature: int = 2048,
    key: str = "eval.fid_weights",
) -> float:
    """FID between image sets (N, 3, H, W) in [-1, 1], computed in this process only.

    `feature` picks the Inception layer (64, 192, 768 or 2048); 2048 is the standard FID. `key` is
    the config key that names the weights, for the error message.
    """
    return fid_against(real, weights_path, device, batch_size, feature, key)(fake)


def fid_against(
    real: Tensor,
    weights_path: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    feature: int = 2048,
    key: str = "eval.fid_weights",
) -> Callable[[Tensor], float]:
    """fake images -> FID against `real` (arguments as `fid`): the real set's Inception features
    are computed once, for scoring many fake sets (each row of `parti.eval.generation`)."""
    if not weights_path or not Path(weights_path).is_file():
        raise FileNotFoundError(_missing_weights_message(weights_path, key))
    _check_images("real", real)
    metric = FrechetInceptionDistance(
        feature=feature,
        feature_extractor_weights_path=str(weights_path),
        reset_real_features=False,  # reset() clears only the fake set's statistics
        sync_on_compute=False,  # a plain local computation, also under torch.distributed
    ).to(device)

    def update(images: Tensor, is_real: bool) -> None:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, torch.float32)
            # uint8 as Inception-v3 FID expects, rounded like `parti.data.transforms.to_uint8`
            # (torchmetrics' normalize=True truncates, turning some exact pixel values 1 lower).
            pixels = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            metric.update(pixels, real=is_real)

    @torch.no_grad()
    def score(fake: Tensor) -> float:
        _check_images("fake", fake)
        metric.reset()
        update(fake, is_real=False)
        return float(metric.compute())

    with torch.no_grad():
        update(real, is_real=True)
    return score


def _check_images(name: str, images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"fid: {name} must be float images (N, 3, H, W) in [-1, 1], got "
            f"{images.dtype} {tuple(images.shape)}"
        )


class _UnloadedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 that keeps its fresh initialisation instead of loading one."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a seeded, randomly initialised Inception-v3 state_dict that `fid` accepts; return path."""
    empty = io.BytesIO()
    torch.save({}, empty)  # what torch-fidelity's constructor "loads": no file, no download
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _UnloadedInceptionV3("inception-v3-compat", ["2048"], empty)
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                # He init keeps activations O(1) through the 94 conv layers (torch's default
                # init shrinks the features to ~1e-8), so FIDs come out on a usable scale.
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
