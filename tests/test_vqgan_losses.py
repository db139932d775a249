"""Stage-1 losses: each term, the GAN schedule, R1, adaptive weight, LPIPS weights offline."""

from __future__ import annotations

import dataclasses
import urllib.request

import pytest
import torch
import torchvision

from parti.config import validate_vqgan
from parti.losses import vqgan
from parti.losses.perceptual import Perceptual, build_perceptual, lpips_distance
from parti.losses.vqgan import VQGANLoss, VQGANLossConfig
from parti.models.discriminator import Discriminator, DiscriminatorConfig
from parti.models.quantizer import QuantizerOutput
from parti.models.vitvqgan import VitVQGAN, VitVQGANConfig
from parti.training.stage1 import VQGANTask
from parti.training.trainer import start_run
from tests.conftest import compose_config, tiny_vqgan_overrides

SIZE = 32


@pytest.fixture(scope="module")
def perceptual():
    return build_perceptual("random", None)


@pytest.fixture
def make_loss(perceptual, monkeypatch):
    """VQGANLoss factory reusing one random-backbone LPIPS network (building one takes seconds)."""
    monkeypatch.setattr(vqgan, "build_perceptual", lambda backbone, path: perceptual)

    def make(**kwargs) -> VQGANLoss:
        return VQGANLoss(VQGANLossConfig(**kwargs))

    return make


def _disc() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(DiscriminatorConfig(channels=8, max_channels=16), SIZE)


class CountingDisc(torch.nn.Module):
    """A discriminator that counts its forwards."""

    def __init__(self):
        super().__init__()
        self.disc, self.calls = _disc(), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.disc(x)


def _quant() -> QuantizerOutput:
    c, k = torch.tensor(0.3), torch.tensor(0.3)
    return QuantizerOutput(
        torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.long), c + 0.25 * k, c, k,
        z_e=torch.zeros(2, 4, 8), codes=torch.eye(8),
    )


def _images(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(2, 3, SIZE, SIZE) * 2 - 1


def test_identical_images_have_zero_reconstruction_terms(make_loss):
    loss = make_loss(l1_weight=1.0, logit_laplace_weight=0.1, disc_start=0)
    x = _images()
    out = loss.generator_loss(x, x.clone(), _quant(), step=0, disc=_disc())
    assert out["l2"] == 0 and out["l1"] == 0 and out["logit_laplace"] == 0
    assert abs(out["perceptual"]) < 1e-6
    assert out["adversarial"] != 0


def test_terms_are_finite_positive_and_sum_to_the_total(make_loss):
    cfg = dict(
        l1_weight=0.5,
        logit_laplace_weight=0.1,
        perceptual_weight=0.1,
        adversarial_weight=0.1,
        disc_start=0,
        codebook_weight=2.0,
    )
    loss = make_loss(**cfg)
    x, y = _images(0), _images(1).requires_grad_(True)
    out = loss.generator_loss(x, y, _quant(), step=5, disc=_disc())
    for key in ("l2", "l1", "logit_laplace", "perceptual", "codebook", "commitment", "total"):
        assert torch.isfinite(out[key]) and out[key] > 0, key
    expected = (
        out["l2"]
        + 0.5 * out["l1"]
        + 0.1 * out["logit_laplace"]
        + 0.1 * out["perceptual"]
        + 0.1 * out["adversarial"]
        + 2.0 * out["quantizer"]
    )
    assert torch.allclose(out["total"], expected)
    assert all(not v.requires_grad for k, v in out.items() if k != "total")
    out["total"].backward()
    assert y.grad.abs().sum() > 0


def test_unweighted_terms_are_left_out(make_loss):
    out = make_loss(perceptual_weight=0.0).generator_loss(
        _images(0), _images(1), _quant(), 0, _disc()
    )
    assert {"l1", "logit_laplace", "perceptual", "adaptive_weight"}.isdisjoint(out)
    assert make_loss(perceptual_weight=0.0).perceptual is None


def test_gan_terms_switch_on_at_disc_start(make_loss):
    loss = make_loss(disc_start=100)
    x, y, disc = _images(0), _images(1), _disc()
    assert not loss.gan_active(99) and loss.gan_active(100)
    assert loss.generator_loss(x, y, _quant(), step=99, disc=disc)["adversarial"] == 0
    assert loss.generator_loss(x, y, _quant(), step=100, disc=disc)["adversarial"] != 0
    with pytest.raises(ValueError, match="disc_start"):
        loss.discriminator_loss(x, y, step=99, disc=disc, disc_step=0)
    out = loss.discriminator_loss(x, y, step=100, disc=disc, disc_step=0)
    assert out["disc_loss"] > 0 and "r1" not in out
    assert not make_loss(adversarial_weight=0.0, disc_start=0).gan_active(10)


def test_adversarial_weight_waits_for_the_warmup_then_ramps_linearly(make_loss):
    loss = make_loss(disc_start=100, disc_warmup=10, perceptual_weight=0.0)
    scales = {step: loss.adversarial_scale(step) for step in (0, 99, 100, 105, 110, 111, 115, 120, 500)}
    assert scales == {0: 0.0, 99: 0.0, 100: 0.0, 105: 0.0, 110: 0.0, 111: 0.1, 115: 0.5,
                      120: 1.0, 500: 1.0}
    assert not loss.gan_active(99) and loss.gan_active(100)  # the discriminator trains from 100
    x, y, disc = _images(0), _images(1), CountingDisc()
    for step in (99, 105, 110):
        out = loss.generator_loss(x, y, _quant(), step=step, disc=disc)
        assert out["adversarial"] == 0 and torch.allclose(out["total"], out["l2"] + out["quantizer"])
    assert disc.calls == 0  # no discriminator forward until the generator's term is on
    for step, scale in ((115, 0.5), (120, 1.0), (300, 1.0)):
        out = loss.generator_loss(x, y, _quant(), step=step, disc=disc)
        assert out["adversarial_scale"] == scale and out["adversarial"] != 0
        expected = out["l2"] + out["quantizer"] + 0.1 * scale * out["adversarial"]
        assert torch.allclose(out["total"], expected)
    assert disc.calls == 3
    assert make_loss(disc_start=100).adversarial_scale(100) == 1.0  # no warmup: on at once


def test_stage1_runs_no_discriminator_before_disc_start(tmp_path):
    overrides = tiny_vqgan_overrides(tmp_path, tmp_path / "run") + [
        "loss.disc_start=2", "loss.disc_warmup=2", "loss.perceptual_weight=0",
        "model.restart_every=0"]
    task = VQGANTask(start_run(compose_config("train_vqgan", overrides), validate_vqgan))
    disc = task.units["disc"].module
    calls = []
    disc.register_forward_hook(lambda module, args, output: calls.append(1))
    batch = [{"image": _images(0)}]
    seen = []
    for step in range(7):
        before = len(calls)
        out = task.train_step(batch, step)
        seen.append((len(calls) - before, out.get("train/adversarial_scale")))
        if step < 2:
            assert all(p.grad is None for p in disc.parameters())
            assert not task.units["disc"].optimizer.state
    # before 2: nothing; 2-4: the discriminator's real + fake forwards; then the generator's too
    assert seen == [(0, None), (0, None), (2, 0.0), (2, 0.0), (2, 0.0), (3, 0.5), (3, 1.0)]
    assert task.disc_steps == 5


def test_hinge_and_non_saturating_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert vqgan.discriminator_adversarial(real, fake, "hinge") == pytest.approx(
        0.5 * (0.25 + 0.75)
    )
    softplus = torch.nn.functional.softplus
    expected = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
    assert torch.allclose(vqgan.discriminator_adversarial(real, fake, "non_saturating"), expected)
    assert vqgan.generator_adversarial(fake, "hinge") == pytest.approx(0.75)
    assert torch.allclose(
        vqgan.generator_adversarial(fake, "non_saturating"), softplus(-fake).mean()
    )
    # a confident, correct discriminator has zero hinge loss but a positive non-saturating one
    real, fake = torch.full((2,), 3.0), torch.full((2,), -3.0)
    assert vqgan.discriminator_adversarial(real, fake, "hinge") == 0
    assert vqgan.discriminator_adversarial(real, fake, "non_saturating") > 0


def test_discriminator_loss_trains_the_discriminator(make_loss):
    disc = _disc()
    out = make_loss(disc_start=0, disc_loss="non_saturating").discriminator_loss(
        _images(0), _images(1), step=0, disc=disc, disc_step=1
    )
    assert set(out) == {"disc_loss", "logits_real", "logits_fake", "total"}
    out["total"].backward()
    assert disc.out.weight.grad.abs().sum() > 0


def test_r1_is_applied_every_r1_every_steps_and_scaled(make_loss):
    loss = make_loss(disc_start=0, r1_weight=2.0, r1_every=4)
    x, y, disc = _images(0), _images(1), _disc()
    applied = [s for s in range(9) if "r1" in loss.discriminator_loss(x, y, 0, disc, disc_step=s)]
    assert applied == [0, 4, 8]
    out = loss.discriminator_loss(x, y, 0, disc, disc_step=4)
    assert out["r1"] > 0
    assert torch.allclose(out["total"], out["disc_loss"] + 0.5 * 2.0 * 4 * out["r1"])
    disc.zero_grad()
    out["total"].backward()  # the penalty is differentiable w.r.t. the discriminator
    assert disc.from_rgb.weight.grad.abs().sum() > 0
    assert "r1" not in make_loss(disc_start=0).discriminator_loss(x, y, 0, disc, disc_step=0)


def test_adaptive_weight_balances_gradients_at_the_last_layer(make_loss):
    torch.manual_seed(0)
    model = VitVQGAN(
        VitVQGANConfig(
            image_size=SIZE,
            enc_dim=32,
            enc_heads=2,
            enc_mlp_dim=64,
            enc_layers=1,
            dec_dim=32,
            dec_heads=2,
            dec_mlp_dim=64,
            dec_layers=1,
            code_dim=8,
        )
    )
    x = _images()
    recon, quant = model(x)
    loss = make_loss(disc_start=0, adaptive_weight=True, perceptual_weight=0.0)
    disc = _disc()
    out = loss.generator_loss(x, recon, quant, step=0, disc=disc, last_layer=model.last_layer)
    (rec_grad,) = torch.autograd.grad(
        torch.nn.functional.mse_loss(recon, x), model.last_layer, retain_graph=True
    )
    (gan_grad,) = torch.autograd.grad(-disc(recon).mean(), model.last_layer, retain_graph=True)
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    assert torch.allclose(out["adaptive_weight"], expected, rtol=1e-4)
    assert 0 < out["adaptive_weight"] <= 1e4
    assert torch.allclose(
        out["total"], out["l2"] + 0.1 * expected * out["adversarial"] + out["quantizer"], rtol=1e-4
    )
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(x, recon, quant, step=0, disc=disc, last_layer=None)
    assert "adaptive_weight" not in loss.generator_loss(
        x, recon, quant, step=-1, disc=disc, last_layer=model.last_layer
    )


def test_perceptual_net_is_frozen_and_stays_in_eval(make_loss, perceptual):
    loss = make_loss()
    loss.train()
    assert not perceptual.training and not perceptual.net.training
    assert all(not p.requires_grad for p in perceptual.parameters())
    x, y = _images(0), _images(1)
    d = lpips_distance(perceptual, x, y)
    assert d.shape == (2,) and (d > 0).all() and not d.requires_grad
    assert torch.equal(d, lpips_distance(perceptual, x, y))  # no dropout: deterministic
    assert torch.allclose(lpips_distance(perceptual, x, x), torch.zeros(2), atol=1e-6)


def test_random_backbone_is_seeded_and_leaves_the_global_rng_alone(perceptual):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = build_perceptual("random", None)
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(again.state_dict().values(), perceptual.state_dict().values()):
        assert torch.equal(a, b)


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("backbone", ["alex", "vgg"])
def test_missing_backbone_weights_say_how_to_provide_them(monkeypatch, tmp_path, backbone):
    _no_network(monkeypatch)
    with pytest.raises(ValueError, match=r"set loss\.perceptual_weights=/path/to/.*state_dict"):
        build_perceptual(backbone, None)
    with pytest.raises(FileNotFoundError, match="does not exist.*perceptual_weights"):
        build_perceptual(backbone, str(tmp_path / "missing.pth"))


def test_alexnet_state_dict_loads_from_a_local_path(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    torch.manual_seed(7)
    alexnet = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(alexnet.state_dict(), path)
    module = build_perceptual("alex", str(path))
    loaded = module.net.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], alexnet.features[0].weight)
    assert torch.equal(loaded["slice5.10.bias"], alexnet.features[10].bias)
    torch.save(alexnet.features.state_dict(), path)  # a features-only state_dict loads too
    loaded = build_perceptual("alex", str(path)).net.net.state_dict()
    assert torch.equal(loaded["slice3.6.weight"], alexnet.features[6].weight)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="shape"):
        build_perceptual("alex", str(path))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(l2_weight=-1.0), "loss.l2_weight"),
        (dict(adversarial_weight=-0.1), "loss.adversarial_weight"),
        (dict(r1_weight=-1.0), "loss.r1_weight"),
        (dict(disc_loss="wasserstein"), "loss.disc_loss"),
        (dict(perceptual_backbone="resnet"), "loss.perceptual_backbone"),
        (dict(perceptual_backbone="vgg"), "loss.perceptual_weights"),
        (dict(r1_every=0), "loss.r1_every"),
        (dict(disc_start=-5), "loss.disc_start"),
        (dict(disc_warmup=-1), "loss.disc_warmup"),
        (dict(l2_weight=0.0, perceptual_weight=0.0), "loss.l2_weight"),
    ],
)
def test_validate_names_the_bad_key(change, key):
    cfg = dataclasses.replace(VQGANLossConfig(), **change)
    with pytest.raises(ValueError, match=rf"config error: {key}:"):
        vqgan.validate(cfg)


def test_validate_accepts_the_defaults_and_a_vgg_path():
    vqgan.validate(VQGANLossConfig())
    vqgan.validate(VQGANLossConfig(perceptual_backbone="vgg", perceptual_weights="/w/vgg16.pth"))


def test_loss_builds_the_configured_perceptual_net():
    assert isinstance(VQGANLoss(VQGANLossConfig()).perceptual, Perceptual)
    with pytest.raises(ValueError, match="perceptual_weights"):
        VQGANLoss(VQGANLossConfig(perceptual_backbone="alex"))
