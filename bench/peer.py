"""The public `parti-pytorch` (PyPI 0.2.0) built offline: no T5, no VGG, no hub downloads.

Its Parti constructor asks the hub for T5's width (`get_encoded_dim`); we answer it locally and feed
random text embeddings through `text_token_embeds`, with a stub VAE that only names the grid.
"""

from __future__ import annotations

from unittest import mock

import torch
from torch import Tensor, nn


class StubVAE(nn.Module):
    """What Parti reads from its VAE: codebook size, image size, grid; one parameter for `.to()`."""

    def __init__(self, codebook_size: int, grid: int):
        super().__init__()
        self.codebook_size, self.image_size, self.grid = codebook_size, grid, grid
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def get_encoded_fmap_size(self, image_size: int) -> int:
        return self.grid


def parti(dim: int, depth: int, heads: int, ff_mult: int, codebook_size: int, grid: int,
          text_dim: int) -> nn.Module:
    """The peer's Parti at the given size, width-matched heads (dim_head = dim / heads)."""
    from parti_pytorch import parti_pytorch as peer

    with mock.patch.object(peer, "get_encoded_dim", lambda name: text_dim):
        model = peer.Parti(dim=dim, depth=depth, dim_head=dim // heads, heads=heads,
                           ff_mult=ff_mult, vae=StubVAE(codebook_size, grid),
                           text_embed_dim=text_dim)
    model.vae = None  # generate() then returns the tokens instead of decoding them
    return model


def feed_text(model: nn.Module, embeds: Tensor, mask: Tensor) -> None:
    """Make the peer's `generate(texts)` see these text embeddings instead of running T5."""
    model.encode_texts = lambda texts, output_device=None: (embeds, mask)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The peer's own optimizer factory (AdamW, decay on matrices only)."""
    from parti_pytorch.optimizer import get_optimizer

    return get_optimizer(model.parameters(), lr=1e-4, wd=1e-2)


def vitvqgan(dim: int, layers: int, heads: int, patch: int, image_size: int,
             codebook_size: int, code_dim: int) -> nn.Module:
    """The peer's VitVQGanVAE without VGG and GAN, with a factorized cosine-similarity codebook."""
    from parti_pytorch.vit_vqgan import VitVQGanVAE

    return VitVQGanVAE(dim=dim, image_size=image_size, layers=layers, use_vgg_and_gan=False,
                       l2_recon_loss=True, lookup_free_quantization=False,
                       codebook_size=codebook_size, vq_codebook_dim=code_dim,
                       encdec_patch_size=patch, encdec_heads=heads, encdec_dim_head=dim // heads)


def vitvqgan_loss(model: nn.Module, images: Tensor) -> Tensor:
    """Reconstruction + quantizer loss through the peer's own encode/decode (its forward drops the
    quantizer loss when VGG and GAN are off)."""
    fmap, _, quantizer_loss = model.encode(images)
    recon = model.decode(fmap)
    return torch.nn.functional.mse_loss(recon, images) + quantizer_loss.sum()
