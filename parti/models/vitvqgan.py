"""ViT-VQGAN image tokenizer: ViT encoder -> factorized quantizer -> ViT decoder (stage 1 of Parti).

An image is cut into p x p patches; each patch is one token of an (h, w) = (H/p, W/p) grid. The
decoder ends in Parti's output head, Linear -> tanh -> Linear with no final sigmoid: it predicts
pixels in [-1, 1] space directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from parti.config_errors import check_config
from parti.models import discriminator
from parti.models.discriminator import DiscriminatorConfig
from parti.models.layers import Position2d, TransformerBlock
from parti.models.quantizer import FactorizedQuantizer, QuantizerOutput


@dataclass
class VitVQGANConfig:
    name: str = "vitvqgan_tiny"  # size name, for logs and exports
    image_size: int = 64  # square input images, pixels
    patch_size: int = 8  # one token per p x p patch: a (image_size / p)^2 token grid
    channels: int = 3  # image channels
    enc_dim: int = 128  # encoder width
    enc_layers: int = 2  # encoder Transformer blocks
    enc_heads: int = 4  # encoder attention heads (divide enc_dim)
    enc_mlp_dim: int = 512  # encoder MLP hidden width
    dec_dim: int = 128  # decoder width
    dec_layers: int = 2  # decoder Transformer blocks
    dec_heads: int = 4  # decoder attention heads (divide dec_dim)
    dec_mlp_dim: int = 512  # decoder MLP hidden width
    codebook_size: int = 512  # number of codes (Parti: 8192)
    code_dim: int = 32  # factorized code dimension (paper: 32)
    beta: float = 0.25  # commitment weight
    dropout: float = 0.0  # attention, MLP and residual dropout in both stacks
    restart_every: int = 100  # dead-code restart interval in steps (0 = off); read by the trainer
    restart_until: int = 0  # last step that may restart dead codes, so the book settles (0 = no end)
    restart_max_fraction: float = 0.25  # cap on codes re-seeded per restart, longest-dead first
    usage_window: int = 100  # training steps over which code usage statistics are accumulated
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)  # GAN discriminator


def validate(cfg: VitVQGANConfig | Any, prefix: str = "model.") -> None:
    """Reject impossible model values (and discriminator values) with a message naming the key."""
    for key in (
        "image_size",
        "patch_size",
        "channels",
        "enc_dim",
        "enc_layers",
        "enc_heads",
        "enc_mlp_dim",
        "dec_dim",
        "dec_layers",
        "dec_heads",
        "dec_mlp_dim",
        "code_dim",
        "usage_window",
    ):
        check_config(getattr(cfg, key) >= 1, prefix + key, f"{getattr(cfg, key)} must be >= 1")
    check_config(
        cfg.image_size % cfg.patch_size == 0,
        prefix + "image_size",
        f"{cfg.image_size} is not a multiple of patch_size {cfg.patch_size}",
    )
    for side in ("enc", "dec"):
        dim, heads = getattr(cfg, f"{side}_dim"), getattr(cfg, f"{side}_heads")
        check_config(
            dim % heads == 0, f"{prefix}{side}_heads", f"{heads} does not divide {side}_dim {dim}"
        )
    check_config(cfg.codebook_size >= 2, prefix + "codebook_size", f"{cfg.codebook_size} must be >= 2")
    check_config(
        cfg.code_dim <= cfg.enc_dim,
        prefix + "code_dim",
        f"{cfg.code_dim} must be <= enc_dim {cfg.enc_dim} (codes are a low-dimensional projection)",
    )
    check_config(cfg.beta >= 0, prefix + "beta", f"{cfg.beta} must be >= 0")
    check_config(0 <= cfg.dropout < 1, prefix + "dropout", f"{cfg.dropout} must be in [0, 1)")
    check_config(
        cfg.restart_every >= 0,
        prefix + "restart_every",
        f"{cfg.restart_every} must be >= 0 (0 = off)",
    )
    check_config(
        cfg.restart_until >= 0,
        prefix + "restart_until",
        f"{cfg.restart_until} must be >= 0 (0 = restart until the end)",
    )
    check_config(
        0 < cfg.restart_max_fraction <= 1,
        prefix + "restart_max_fraction",
        f"{cfg.restart_max_fraction} must be in (0, 1]",
    )
    discriminator.validate_image_size(cfg.image_size, prefix + "image_size")
    discriminator.validate(cfg.disc, prefix + "disc.")


def count_block_params(cfg: VitVQGANConfig | Any) -> dict[str, int]:
    """Parameters of each stack's Transformer blocks as their shapes imply (no embeddings/heads).

    Per block: attention 4d^2 + 4d, MLP 2dm + m + d, two LayerNorms 4d; with m = 4d this is
    12d^2 + 13d, the paper's 12d^2 plus biases and norms.
    """

    def stack(dim: int, mlp: int, layers: int) -> int:
        return layers * (4 * dim * dim + 4 * dim + 2 * dim * mlp + mlp + dim + 4 * dim)

    return {
        "encoder": stack(cfg.enc_dim, cfg.enc_mlp_dim, cfg.enc_layers),
        "decoder": stack(cfg.dec_dim, cfg.dec_mlp_dim, cfg.dec_layers),
    }


class ViTEncoder(nn.Module):
    """Patchify + Linear, 2D positions, pre-norm Transformer blocks, final LayerNorm."""

    def __init__(self, cfg: VitVQGANConfig):
        super().__init__()
        grid, p = cfg.image_size // cfg.patch_size, cfg.patch_size
        self.patch_size = p
        self.patch_embed = nn.Linear(p * p * cfg.channels, cfg.enc_dim)
        self.pos = Position2d(grid, grid, cfg.enc_dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.enc_dim, cfg.enc_heads, cfg.enc_mlp_dim, cfg.dropout)
            for _ in range(cfg.enc_layers)
        )
        self.norm = nn.LayerNorm(cfg.enc_dim)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> token vectors (B, h*w, enc_dim) in raster order."""
        p = self.patch_size
        x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_embed(x) + self.pos()  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ViTDecoder(nn.Module):
    """Linear code_dim -> dec_dim (the codes' up-projection), positions, blocks, LayerNorm, head."""

    def __init__(self, cfg: VitVQGANConfig):
        super().__init__()
        self.grid, self.patch_size = cfg.image_size // cfg.patch_size, cfg.patch_size
        p = cfg.patch_size
        self.code_embed = nn.Linear(cfg.code_dim, cfg.dec_dim)
        self.pos = Position2d(self.grid, self.grid, cfg.dec_dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dec_dim, cfg.dec_heads, cfg.dec_mlp_dim, cfg.dropout)
            for _ in range(cfg.dec_layers)
        )
        self.norm = nn.LayerNorm(cfg.dec_dim)
        self.head = nn.Sequential(
            nn.Linear(cfg.dec_dim, cfg.dec_dim),
            nn.Tanh(),
            nn.Linear(cfg.dec_dim, p * p * cfg.channels),
        )

    def forward(self, codes: Tensor) -> Tensor:
        """codes (B, h*w, code_dim) -> images (B, C, H, W), unbounded around [-1, 1]."""
        x = self.code_embed(codes) + self.pos()  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x))  # (B, N, p*p*C)
        p = self.patch_size
        return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=self.grid, p1=p, p2=p)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VitVQGAN(nn.Module):
    """The image tokenizer: `encode` images to ids, `decode` ids to images, `forward` to train."""

    def __init__(self, cfg: VitVQGANConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg)
        self.quantizer = FactorizedQuantizer(
            cfg.enc_dim,
            cfg.codebook_size,
            cfg.code_dim,
            cfg.beta,
            cfg.usage_window,
            cfg.restart_max_fraction,
        )
        self.decoder = ViTDecoder(cfg)
        self.apply(_init_weights)

    @property
    def grid(self) -> int:
        """Tokens per side: image_size // patch_size."""
        return self.cfg.image_size // self.cfg.patch_size

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final output Linear (for the adaptive GAN weight)."""
        return self.decoder.head[-1].weight

    def _check_images(self, images: Tensor) -> None:
        c, s = self.cfg.channels, self.cfg.image_size
        if (
            images.ndim != 4
            or tuple(images.shape[1:]) != (c, s, s)
            or not images.is_floating_point()
        ):
            raise ValueError(
                f"{self.cfg.name} expects float images (B, {c}, {s}, {s}) in [-1, 1], "
                f"got {images.dtype} {tuple(images.shape)}"
            )

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """images (B, C, H, W) in [-1, 1] -> (reconstruction (B, C, H, W), quantizer output)."""
        self._check_images(images)
        quant = self.quantizer(self.encoder(images))
        return self.decoder(quant.quantized), quant

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [-1, 1] -> token ids, long (B, h, w); records no statistics."""
        self._check_images(images)
        ids = self.quantizer.nearest(self.quantizer.project(self.encoder(images)))  # (B, N)
        return ids.view(-1, self.grid, self.grid)

    def decode(self, ids: Tensor) -> Tensor:
        """Token ids (B, h, w) or (B, h*w) -> images (B, C, H, W)."""
        n = self.grid * self.grid
        integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
        if not integer or not (
            (ids.ndim == 3 and tuple(ids.shape[1:]) == (self.grid, self.grid))
            or (ids.ndim == 2 and ids.shape[1] == n)
        ):
            raise ValueError(
                f"decode expects integer ids (B, {self.grid}, {self.grid}) or (B, {n}), "
                f"got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.cfg.codebook_size):
            raise ValueError(
                f"token ids must be in [0, {self.cfg.codebook_size}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        return self.decode_codes(self.quantizer.embed(ids.reshape(ids.shape[0], n).long()))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, h*w, code_dim), e.g. `QuantizerOutput.quantized` -> images (B, C, H, W)."""
        shape = (self.grid * self.grid, self.cfg.code_dim)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != shape:
            raise ValueError(
                f"decode_codes expects (B, {shape[0]}, {shape[1]}), got {tuple(codes.shape)}"
            )
        return self.decoder(codes)
