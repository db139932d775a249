"""Stage-1 losses: reconstruction (L2, L1, logit-Laplace), perceptual, adversarial, codebook.

Both methods return a dict of tensors; the trainer logs them. Every value but `total` is detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parti.config_errors import check_config
from parti.losses.perceptual import BACKBONES, build_perceptual
from parti.models.quantizer import QuantizerOutput, code_entropy

DISC_LOSSES = ("hinge", "non_saturating")
# DALL-E's logit-Laplace squashes pixels into [eps, 1 - eps] so that their logits stay finite.
_LAPLACE_EPS = 0.1


@dataclass
class VQGANLossConfig:
    l2_weight: float = 1.0  # pixel mean squared error
    l1_weight: float = 0.0  # pixel mean absolute error
    logit_laplace_weight: float = 0.0  # L1 in logit space (ViT-VQGAN: 0.1; Parti removed it)
    perceptual_weight: float = 0.1  # LPIPS
    perceptual_backbone: str = "random"  # random | alex | vgg ; random = seeded random backbone
    perceptual_weights: str | None = None  # alex/vgg: local torchvision state_dict path
    adversarial_weight: float = 0.1  # generator's GAN term
    disc_start: int = 2000  # the discriminator starts training at this step
    disc_warmup: int = 0  # D trains alone this long, then G's GAN term ramps in over as long
    disc_loss: str = "hinge"  # hinge | non_saturating
    r1_weight: float = 0.0  # R1 gradient penalty weight (0 = off)
    r1_every: int = 16  # lazy R1: apply every k discriminator steps (scaled by k)
    adaptive_weight: bool = False  # scale adversarial term by grad-norm ratio at the last layer
    codebook_weight: float = 1.0  # weight of the quantizer loss (codebook + beta * commitment)
    entropy_weight: float = 0.0  # code entropy penalty: per-vector entropy - batch entropy (0 = off)
    entropy_temperature: float = 0.01  # softmax temperature over cosine similarities
    entropy_samples: int = 1024  # encoder vectors scored per step (0 = all of them)


def validate(cfg: VQGANLossConfig | Any, prefix: str = "loss.") -> None:
    """Reject impossible loss values with a message naming the key."""
    weights = (
        "l2_weight",
        "l1_weight",
        "logit_laplace_weight",
        "perceptual_weight",
        "adversarial_weight",
        "r1_weight",
        "codebook_weight",
        "entropy_weight",
    )
    for key in weights:
        check_config(getattr(cfg, key) >= 0, prefix + key, f"{getattr(cfg, key)} must be >= 0")
    check_config(cfg.entropy_temperature > 0, prefix + "entropy_temperature",
                 f"{cfg.entropy_temperature} must be > 0")
    check_config(cfg.entropy_samples >= 0, prefix + "entropy_samples",
                 f"{cfg.entropy_samples} must be >= 0 (0 = all vectors)")
    check_config(
        cfg.l2_weight + cfg.l1_weight + cfg.logit_laplace_weight + cfg.perceptual_weight > 0,
        prefix + "l2_weight",
        "l2, l1, logit_laplace and perceptual weights are all 0: nothing "
        "would teach the decoder to reconstruct",
    )
    check_config(
        cfg.perceptual_backbone in BACKBONES,
        prefix + "perceptual_backbone",
        f"{cfg.perceptual_backbone!r} is not one of {BACKBONES}",
    )
    check_config(
        cfg.perceptual_weight == 0
        or cfg.perceptual_backbone == "random"
        or bool(cfg.perceptual_weights),
        prefix + "perceptual_weights",
        f"perceptual_backbone={cfg.perceptual_backbone!r} needs a local torchvision state_dict: "
        f"set {prefix}perceptual_weights=/path/to/weights.pth (or perceptual_backbone=random)",
    )
    check_config(cfg.disc_start >= 0, prefix + "disc_start", f"{cfg.disc_start} must be >= 0")
    check_config(cfg.disc_warmup >= 0, prefix + "disc_warmup", f"{cfg.disc_warmup} must be >= 0")
    check_config(
        cfg.disc_loss in DISC_LOSSES,
        prefix + "disc_loss",
        f"{cfg.disc_loss!r} is not one of {DISC_LOSSES}",
    )
    check_config(cfg.r1_every >= 1, prefix + "r1_every", f"{cfg.r1_every} must be >= 1")


def _to_unit(x: Tensor) -> Tensor:
    """[-1, 1] pixels -> [eps, 1 - eps]."""
    return _LAPLACE_EPS + (1 - 2 * _LAPLACE_EPS) * ((x + 1) / 2).clamp(0, 1)


def logit_laplace_loss(images: Tensor, recon: Tensor) -> Tensor:
    """NLL of a unit-scale logit-Laplace without its constants: mean |logit(x) - logit(y)|."""
    return (torch.logit(_to_unit(images)) - torch.logit(_to_unit(recon))).abs().mean()


def generator_adversarial(logits_fake: Tensor, kind: str) -> Tensor:
    """The generator's GAN loss from the discriminator's logits on reconstructions."""
    return -logits_fake.mean() if kind == "hinge" else F.softplus(-logits_fake).mean()


def discriminator_adversarial(logits_real: Tensor, logits_fake: Tensor, kind: str) -> Tensor:
    """The discriminator's GAN loss: the mean of its real and fake terms."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """||d rec / d W|| / (||d gan / d W|| + 1e-4) at the last layer W; in [0, 1e4], detached.

    Balances the two gradients where they meet (taming-transformers' VQGAN recipe).
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


class VQGANLoss(nn.Module):
    """Stage 1's generator (tokenizer) and discriminator objectives, with a frozen LPIPS net."""

    def __init__(self, cfg: VQGANLossConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.perceptual = (
            build_perceptual(cfg.perceptual_backbone, cfg.perceptual_weights)
            if cfg.perceptual_weight > 0
            else None
        )

    def gan_active(self, step: int) -> bool:
        """Whether the discriminator trains: adversarial_weight > 0 and step >= disc_start."""
        return self.cfg.adversarial_weight > 0 and step >= self.cfg.disc_start

    def adversarial_scale(self, step: int) -> float:
        """Fraction in [0, 1] of adversarial_weight that the generator's GAN term gets at `step`.

        0 until disc_start + disc_warmup (a fresh discriminator's gradients would wreck the
        reconstructions), then linear up to 1 at disc_start + 2 * disc_warmup. With disc_warmup 0
        it is 1 from disc_start on.
        """
        if not self.gan_active(step):
            return 0.0
        warmup = self.cfg.disc_warmup
        if warmup == 0:
            return 1.0
        return min(1.0, max(0.0, (step - self.cfg.disc_start - warmup) / warmup))

    def generator_loss(
        self,
        images: Tensor,
        recon: Tensor,
        quant: QuantizerOutput,
        step: int,
        disc: nn.Module,
        last_layer: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Tokenizer loss on images/recon (B, C, H, W) in [-1, 1].

        Keys: l2, l1 and logit_laplace (when weighted), perceptual (when weighted), adversarial
        (0, and no discriminator call, while `adversarial_scale(step)` is 0), adversarial_scale
        (once the discriminator trains), adaptive_weight (when configured and the term is on),
        codebook, commitment, quantizer (codebook + beta * commitment), total. `last_layer` is
        required when adaptive_weight is on.
        """
        cfg = self.cfg
        images, recon = images.float(), recon.float()
        out: dict[str, Tensor] = {"l2": F.mse_loss(recon, images)}
        rec = cfg.l2_weight * out["l2"]
        if cfg.l1_weight > 0:
            out["l1"] = (recon - images).abs().mean()
            rec = rec + cfg.l1_weight * out["l1"]
        if cfg.logit_laplace_weight > 0:
            out["logit_laplace"] = logit_laplace_loss(images, recon)
            rec = rec + cfg.logit_laplace_weight * out["logit_laplace"]
        if self.perceptual is not None:
            out["perceptual"] = self.perceptual(images, recon).mean()
            rec = rec + cfg.perceptual_weight * out["perceptual"]
        adversarial = recon.new_zeros(())
        scale = self.adversarial_scale(step)
        weight = recon.new_tensor(cfg.adversarial_weight * scale)
        if self.gan_active(step):
            out["adversarial_scale"] = recon.new_tensor(scale)
        if scale > 0:
            adversarial = generator_adversarial(disc(recon), cfg.disc_loss)
            if cfg.adaptive_weight:
                if last_layer is None:
                    raise ValueError("loss.adaptive_weight is on: pass the decoder's last_layer")
                out["adaptive_weight"] = adaptive_gan_weight(rec, adversarial, last_layer)
                weight = weight * out["adaptive_weight"]
        out["adversarial"] = adversarial
        out["codebook"] = quant.codebook_loss
        out["commitment"] = quant.commitment_loss
        out["quantizer"] = quant.loss
        total = rec + weight * adversarial + cfg.codebook_weight * quant.loss
        if cfg.entropy_weight > 0:
            out["code_entropy"], out["batch_entropy"] = code_entropy(
                quant.z_e, quant.codes, cfg.entropy_temperature, cfg.entropy_samples)
            total = total + cfg.entropy_weight * (out["code_entropy"] - out["batch_entropy"])
        out = {key: value.detach() for key, value in out.items()}
        out["total"] = total
        return out

    def discriminator_loss(
        self, images: Tensor, recon_detached: Tensor, step: int, disc: nn.Module, disc_step: int
    ) -> dict[str, Tensor]:
        """Discriminator loss on real images and detached reconstructions (B, C, H, W).

        Call it only when `gan_active(step)`: before that there is nothing to train. R1 on the real
        images is applied when r1_weight > 0 and `disc_step % r1_every == 0` (lazy, scaled by
        r1_every). Keys: disc_loss, logits_real, logits_fake (batch means), r1 (when applied),
        total.
        """
        cfg = self.cfg
        if not self.gan_active(step):
            raise ValueError(
                f"discriminator_loss called at step {step}: the GAN is off before "
                f"loss.disc_start={cfg.disc_start} (or adversarial_weight is 0)"
            )
        apply_r1 = cfg.r1_weight > 0 and disc_step % cfg.r1_every == 0
        real = images.detach().requires_grad_(apply_r1)
        logits_real = disc(real).float()
        logits_fake = disc(recon_detached.detach()).float()
        disc_loss = discriminator_adversarial(logits_real, logits_fake, cfg.disc_loss)
        total = disc_loss
        out = {"logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        if apply_r1:
            (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
            out["r1"] = grad.float().square().sum(dim=(1, 2, 3)).mean()
            total = total + 0.5 * cfg.r1_weight * cfg.r1_every * out["r1"]
        out["disc_loss"] = disc_loss
        out = {key: value.detach() for key, value in out.items()}
        out["total"] = total
        return out
