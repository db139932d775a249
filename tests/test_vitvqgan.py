"""ViT-VQGAN: shapes, encode/decode round trip, a short fit, parameter counts, discriminator."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from parti.models import discriminator, vitvqgan
from parti.models.discriminator import Discriminator, DiscriminatorConfig, minibatch_std
from parti.models.vitvqgan import VitVQGAN, VitVQGANConfig, count_block_params
from parti.training.ema import EMA

# Block shapes of ViT-VQGAN Table 2 (shared/reference/papers.md): (layers, heads, dim, mlp).
SIZES = {
    "vitvqgan_tiny": (2, 4, 128, 512),
    "vitvqgan_small": (8, 8, 512, 2048),
    "vitvqgan_base": (12, 12, 768, 3072),
    "vitvqgan_large": (32, 16, 1280, 5120),
}
# The paper's parameter column: one stack, blocks only (Small's 32M does not follow from its shape).
PAPER_PARAMS = {"vitvqgan_base": 91e6, "vitvqgan_large": 599e6}


def _tiny(**kwargs) -> VitVQGANConfig:
    small = dict(
        image_size=32,
        patch_size=8,
        enc_dim=32,
        enc_layers=1,
        enc_heads=2,
        enc_mlp_dim=64,
        dec_dim=32,
        dec_layers=1,
        dec_heads=2,
        dec_mlp_dim=64,
        codebook_size=64,
        code_dim=8,
    )
    return VitVQGANConfig(**{**small, **kwargs})


def _model(**kwargs) -> VitVQGAN:
    torch.manual_seed(0)
    return VitVQGAN(_tiny(**kwargs))


def test_encode_decode_shapes_and_dtypes():
    model = _model().eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = model.encode(images)
    assert model.grid == 4
    assert ids.dtype == torch.long and ids.shape == (3, 4, 4)
    assert 0 <= int(ids.min()) and int(ids.max()) < 64
    out = model.decode(ids)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 32, 32)
    assert torch.equal(model.decode(ids.flatten(1)), out)
    assert torch.equal(model.decode(ids.to(torch.int16)), out)  # token shards store small ints


def test_decode_of_encode_equals_forward_reconstruction_in_eval_mode():
    model = _model().eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, quant = model(images)
    assert torch.equal(quant.ids.view(2, 4, 4), model.encode(images))
    with torch.no_grad():
        assert torch.allclose(model.decode(model.encode(images)), recon, atol=1e-5)
        assert torch.allclose(model.decode_codes(quant.quantized), recon, atol=1e-6)


def test_bad_inputs_are_rejected_with_the_expected_shape():
    model = _model()
    with pytest.raises(ValueError, match=r"expects float images \(B, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="got torch.uint8"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"decode expects integer ids"):
        model.decode(torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"decode expects integer ids"):
        model.decode(torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"must be in \[0, 64\)"):
        model.decode(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match="decode_codes expects"):
        model.decode_codes(torch.zeros(1, 16, 32))


def test_init_and_last_layer():
    model = _model()
    assert model.last_layer is model.decoder.head[-1].weight
    assert model.last_layer.shape == (8 * 8 * 3, 32)
    assert torch.count_nonzero(model.encoder.patch_embed.bias) == 0
    assert model.encoder.patch_embed.weight.abs().max() <= 0.04 + 1e-6  # trunc normal at 2 std
    assert torch.equal(model.encoder.norm.weight, torch.ones(32))


def test_a_few_adam_steps_lower_the_reconstruction_loss():
    model = _model().train()
    torch.manual_seed(1)
    images = F.interpolate(torch.rand(8, 3, 2, 2) * 2 - 1, size=32, mode="bilinear")  # smooth
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        recon, quant = model(images)
        l2 = F.mse_loss(recon, images)
        opt.zero_grad()
        (l2 + quant.loss).backward()
        opt.step()
        losses.append(l2.item())
    assert losses[-1] < 0.6 * losses[0]


def test_decoder_can_be_trained_with_encoder_and_codebook_frozen():
    """Parti's recipe: fine-tune a (larger) decoder on a frozen encoder and codebook."""
    model = _model()
    model.encoder.requires_grad_(False)
    model.quantizer.requires_grad_(False)
    recon, _ = model(torch.rand(2, 3, 32, 32))
    recon.square().mean().backward()
    assert model.decoder.code_embed.weight.grad is not None
    assert model.encoder.patch_embed.weight.grad is None


@pytest.mark.parametrize("name", SIZES)
def test_every_size_has_the_parameter_count_its_shape_implies(name):
    layers, heads, dim, mlp = SIZES[name]
    shape = dict(
        enc_dim=dim,
        enc_layers=layers,
        enc_heads=heads,
        enc_mlp_dim=mlp,
        dec_dim=dim,
        dec_layers=layers,
        dec_heads=heads,
        dec_mlp_dim=mlp,
    )
    size = dict(image_size=256, codebook_size=8192) if name != "vitvqgan_tiny" else {}
    cfg = VitVQGANConfig(name=name, **shape, **size)
    with torch.device("meta"):
        model = VitVQGAN(cfg)
    counted = {
        stack: sum(p.numel() for p in getattr(model, stack).blocks.parameters())
        for stack in ("encoder", "decoder")
    }
    assert counted == count_block_params(cfg)
    reference = 12 * layers * dim * dim
    assert abs(counted["encoder"] - reference) / reference < 0.02
    if name in PAPER_PARAMS:
        assert abs(counted["encoder"] - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.07


@pytest.mark.parametrize("size", [32, 64, 128])
def test_discriminator_gives_one_logit_per_image(size):
    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig(channels=8, max_channels=32), size)
    assert len(disc.blocks) == {32: 3, 64: 4, 128: 5}[size]
    logits = disc(torch.randn(5, 3, size, size))  # 5 is not a multiple of the group size 4
    assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_discriminator_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(DiscriminatorConfig(), 48)
    disc = Discriminator(DiscriminatorConfig(channels=8, max_channels=16), 32)
    with pytest.raises(ValueError, match=r"\(B, C, 32, 32\)"):
        disc(torch.randn(2, 3, 64, 64))


def test_minibatch_std_groups():
    x = torch.randn(6, 4, 4, 4)
    out = minibatch_std(x, 4)  # 6 -> groups of 3 (largest divisor <= 4)
    assert out.shape == (6, 5, 4, 4) and torch.equal(out[:, :4], x)
    groups = x.view(3, 2, 4, 4, 4)  # sample m + 2i is in group m
    expected = groups.std(dim=0, unbiased=False).mean(dim=(1, 2, 3))
    assert torch.allclose(out[:, 4, 0, 0], expected.repeat(3), atol=1e-4)
    assert torch.allclose(minibatch_std(x[:1], 4)[:, 4], torch.full((1, 4, 4), 1e-4))


def test_discriminator_without_minibatch_std():
    disc = Discriminator(DiscriminatorConfig(channels=8, max_channels=16, mbstd_group=1), 32)
    assert disc.conv.in_channels == 16
    assert disc(torch.randn(3, 3, 32, 32)).shape == (3,)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(code_dim=256), "model.code_dim"),
        (dict(image_size=60), "model.image_size"),
        (dict(image_size=96, patch_size=8), "model.image_size"),
        (dict(enc_heads=3), "model.enc_heads"),
        (dict(dec_heads=5), "model.dec_heads"),
        (dict(codebook_size=1), "model.codebook_size"),
        (dict(beta=-0.1), "model.beta"),
        (dict(dropout=1.0), "model.dropout"),
        (dict(restart_every=-1), "model.restart_every"),
        (dict(restart_until=-1), "model.restart_until"),
        (dict(restart_max_fraction=0.0), "model.restart_max_fraction"),
        (dict(restart_max_fraction=1.5), "model.restart_max_fraction"),
        (dict(usage_window=0), "model.usage_window"),
        (dict(dec_layers=0), "model.dec_layers"),
        (dict(disc=DiscriminatorConfig(channels=64, max_channels=32)), "model.disc.max_channels"),
        (dict(disc=DiscriminatorConfig(mbstd_group=0)), "model.disc.mbstd_group"),
    ],
)
def test_validate_names_the_bad_key(change, key):
    cfg = dataclasses.replace(VitVQGANConfig(), **change)
    with pytest.raises(ValueError, match=rf"config error: {key}:"):
        vitvqgan.validate(cfg)
    with pytest.raises(ValueError, match=key.removeprefix("model.")):
        VitVQGAN(cfg)


def test_validate_accepts_the_defaults():
    vitvqgan.validate(VitVQGANConfig())
    discriminator.validate(DiscriminatorConfig())


def test_ema_averages_parameters_and_copies_buffers():
    model = _model().train()
    ema = EMA(model, decay=0.5)
    start = {k: v.clone() for k, v in model.named_parameters()}
    model(torch.rand(2, 3, 32, 32) * 2 - 1)  # records code usage and recent vectors (buffers)
    model.quantizer.restart_dead_codes()  # moves codebook rows and dead_for
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in ema.params.items():
        assert torch.allclose(p, (start[name] + dict(model.named_parameters())[name]) / 2), name
    for name, b in ema.buffers.items():
        assert torch.equal(b, dict(model.named_buffers())[name]), name
    assert int(ema.buffers["quantizer.recent_pos"]) > 0 and ema.buffers["quantizer.dead_for"].any()
