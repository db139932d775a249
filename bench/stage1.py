"""Stage 1 side by side: a ViT-VQGAN training step, ours against the peer at one size, and ours
with the perceptual and adversarial terms on (the peer's need hub weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench import peer
from parti.losses.vqgan import VQGANLoss, VQGANLossConfig
from parti.models.discriminator import Discriminator, DiscriminatorConfig
from parti.models.vitvqgan import VitVQGAN, VitVQGANConfig
from parti.training.optim import build_optimizer


@dataclass(frozen=True)
class Size:
    """One matched size: image, patch, width, layers per stack, heads, codebook (vitvqgan_tiny)."""

    image_size: int = 64
    patch_size: int = 4
    dim: int = 128
    layers: int = 2
    heads: int = 4
    codebook_size: int = 512
    code_dim: int = 32


def adam() -> object:
    """Our stage-1 optimizer config (conf/optim/adam.yaml) with a fixed lr."""
    return OmegaConf.create({"name": "adam", "lr": 1e-4, "betas": [0.9, 0.99], "eps": 1e-8,
                             "weight_decay": 1e-4})


def ours(size: Size) -> VitVQGAN:
    return VitVQGAN(VitVQGANConfig(
        image_size=size.image_size, patch_size=size.patch_size, enc_dim=size.dim,
        enc_layers=size.layers, enc_heads=size.heads, enc_mlp_dim=4 * size.dim, dec_dim=size.dim,
        dec_layers=size.layers, dec_heads=size.heads, dec_mlp_dim=4 * size.dim,
        codebook_size=size.codebook_size, code_dim=size.code_dim))


def train_steps(size: Size, batch: int) -> dict:
    """Closures of one training step each (reconstruction + quantizer losses): ours and the peer's."""
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size.image_size, size.image_size) * 2 - 1
    model = ours(size)
    optimizer = build_optimizer(model, adam())

    def ours_step() -> None:
        recon, quant = model(images)
        (F.mse_loss(recon, images) + quant.loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    other = peer.vitvqgan(size.dim, size.layers, size.heads, size.patch_size, size.image_size,
                          size.codebook_size, size.code_dim)
    other_opt = peer.optimizer(other)

    def peer_step() -> None:
        peer.vitvqgan_loss(other, images).backward()
        other_opt.step()
        other_opt.zero_grad(set_to_none=True)

    return {"ours": ours_step, "peer": peer_step}


def full_loss_step(size: Size, batch: int) -> dict:
    """Ours with LPIPS (random backbone, nothing downloaded) and the GAN on: generator step, then
    discriminator step, as `parti.training.stage1` takes them."""
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size.image_size, size.image_size) * 2 - 1
    model = ours(size)
    disc = Discriminator(DiscriminatorConfig(), size.image_size)
    loss = VQGANLoss(VQGANLossConfig(perceptual_weight=0.1, adversarial_weight=0.1, disc_start=0))
    g_opt, d_opt = build_optimizer(model, adam()), build_optimizer(disc, adam())

    def step() -> None:
        recon, quant = model(images)
        disc.requires_grad_(False)
        loss.generator_loss(images, recon, quant, 0, disc)["total"].backward()
        disc.requires_grad_(True)
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)
        loss.discriminator_loss(images, recon.detach(), 0, disc, 1)["total"].backward()
        d_opt.step()
        d_opt.zero_grad(set_to_none=True)

    return {"ours": step}
