"""FID through torchmetrics on a seeded random Inception-v3 (no download): identical sets score ~0,
a brightness-shifted set scores well above a second sample of the same distribution, and a
missing weights file names `eval.fid_weights`.

The 64-wide Inception features (`feature=64`, the first conv stack) keep this fast on CPU; the
2048-wide default runs the whole network and a 2048x2048 eigendecomposition (~10 s more).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity import feature_extractor_inceptionv3 as inceptionv3

from parti.data.shapes import generate
from parti.eval.fid import fid, fid_against, random_inception_weights

N = 16  # images per set, fed in two batches of 8: ~3 s a score on 2 busy CPU cores


def shapes(n: int, seed: int) -> torch.Tensor:
    """Shapes images (n, 3, 64, 64) in [-1, 1]."""
    pixels = np.stack([image for _, image, _, _ in generate(n, seed, size=64)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_inception_weights(tmp_path_factory.mktemp("fid") / "inception.pth")


def test_random_weights_are_deterministic(weights, tmp_path):
    again = torch.load(random_inception_weights(tmp_path / "again.pth", seed=0))
    first = torch.load(weights)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_identical_sets_score_zero_and_a_shift_scores_higher(weights, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download Inception weights")

    monkeypatch.setattr(inceptionv3, "load_state_dict_from_url", no_download)
    real, other = shapes(N, seed=0), shapes(N, seed=1)
    # Features here are O(0.4) over 64 dims; identical statistics leave only float64 round-off
    # (measured ~2e-6; N < 64 makes the covariance rank-deficient, which torchmetrics handles).
    assert abs(fid(real, real, weights, batch_size=8, feature=64)) < 1e-2
    same_distribution = fid(real, other, weights, batch_size=8, feature=64)
    shifted = fid(real, (other + 0.5).clamp(-1, 1), weights, batch_size=8, feature=64)
    assert same_distribution > 1e-2  # a different sample is not scored as identical
    assert shifted > 3 * same_distribution  # measured: 0.30 vs 5.1


@pytest.mark.parametrize("path", ["", "/nonexistent/inception.pth"])
def test_missing_weights_name_the_config_key(path):
    images = shapes(2, seed=0)
    with pytest.raises(FileNotFoundError, match=r"eval\.fid_weights") as info:
        fid(images, images, path)
    assert "Nothing is downloaded" in str(info.value)


def test_one_real_set_scores_many_fake_sets_as_separate_calls_do(weights):
    real, other = shapes(N, seed=0), shapes(N, seed=1)
    score = fid_against(real, weights, batch_size=8, feature=64)
    fakes = [other, (other + 0.5).clamp(-1, 1), real]
    assert [score(f) for f in fakes] == pytest.approx(
        [fid(real, f, weights, batch_size=8, feature=64) for f in fakes], rel=1e-6, abs=1e-6)
