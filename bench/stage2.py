"""Stage 2 side by side: training steps and guided sampling, ours against the peer at one size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench import peer
from parti.models.parti import Parti, PartiConfig
from parti.sampling import SamplingConfig, sample_tokens
from parti.training.optim import build_optimizer

GUIDANCE = 3.0  # the peer's generate() always guides at 3 (its cond_scale is not passed on)
PEER_TOP_FRACTION = 0.1  # the peer's filter_thres=0.9 keeps the top 10% of the logits


@dataclass(frozen=True)
class Size:
    """One matched size: width, decoder depth, heads, MLP multiple, codebook, text length; ours
    with `kv_heads` key/value heads (None: one per query head; the peer always has one) and
    `bias`es or not (the peer has none)."""

    dim: int = 256
    dec_layers: int = 4
    heads: int = 8
    kv_heads: int | None = None
    bias: bool = True
    ff_mult: int = 4
    codebook_size: int = 1024
    text_len: int = 32
    vocab_size: int = 512


def ours(size: Size, grid: int) -> Parti:
    cfg = PartiConfig(vocab_size=size.vocab_size, text_len=size.text_len,
                      codebook_size=size.codebook_size, image_grid=grid, dim=size.dim,
                      enc_layers=1, dec_layers=size.dec_layers, heads=size.heads,
                      kv_heads=size.kv_heads, bias=size.bias,
                      mlp_dim=size.ff_mult * size.dim, dropout=0.0)
    return Parti(cfg)


def theirs(size: Size, grid: int) -> torch.nn.Module:
    return peer.parti(size.dim, size.dec_layers, size.heads, size.ff_mult, size.codebook_size,
                      grid, size.dim)


def adamw() -> object:
    """Our stage-2 optimizer config (conf/optim/adamw.yaml) with a fixed lr."""
    return OmegaConf.create({"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.96], "eps": 1e-8,
                             "weight_decay": 0.045})


def text(size: Size, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random caption ids (B, L) with a mask, and the empty caption's (1, L)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, size.vocab_size, (batch, size.text_len), generator=g)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def our_train_step(size: Size, grid: int, batch: int, compile: bool = False) -> dict:
    """Our training step (optionally compiled) as a closure, its FLOPs per image token and the
    image tokens it trains on."""
    torch.manual_seed(0)
    n = grid * grid
    model = ours(size, grid)
    optimizer = build_optimizer(model, adamw())
    forward = torch.compile(model) if compile else model
    ids, mask = text(size, batch)
    tokens = torch.randint(0, size.codebook_size, (batch, n))

    def ours_step() -> None:
        logits = forward(ids, mask, tokens).float()
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"ours": ours_step, "flops_per_token": model.flops_per_token(), "tokens": tokens}


def train_steps(size: Size, grid: int, batch: int, compile: bool = False) -> dict:
    """`our_train_step` and the peer's step on the same image tokens (random text embeddings)."""
    steps = our_train_step(size, grid, batch, compile)
    tokens = steps.pop("tokens")
    other = theirs(size, grid)
    other_opt = peer.optimizer(other)
    embeds = torch.randn(batch, size.text_len, size.dim)
    embed_mask = torch.ones(batch, size.text_len, dtype=torch.bool)

    def peer_step() -> None:
        other(text_token_embeds=embeds, text_mask=embed_mask, image_token_ids=tokens,
              return_loss=True).backward()
        other_opt.step()
        other_opt.zero_grad(set_to_none=True)

    return {**steps, "peer": peer_step}


def our_samplers(size: Size, grid: int, batch: int, compile_mode: str | None = None) -> dict:
    """Closures that each sample one batch of full images with guidance: ours and (given a
    `compile_mode`) ours with `compile=True` in that mode (the same computation as fixed-shape
    steps)."""
    torch.manual_seed(0)
    model = ours(size, grid).eval()
    ids, mask = text(size, batch)
    empty_ids, empty_mask = text(size, 1, seed=1)
    cfg = SamplingConfig(guidance=GUIDANCE, top_k=int(PEER_TOP_FRACTION * size.codebook_size))
    seeds = list(range(batch))

    def sampler(cfg: SamplingConfig) -> Callable[[], torch.Tensor]:
        return lambda: sample_tokens(model, ids, mask, empty_ids, empty_mask, seeds, cfg)

    fns = {"ours": sampler(cfg)}
    if compile_mode is not None:
        fns["compiled"] = sampler(replace(cfg, compile=True, compile_mode=compile_mode))
    return fns


def samplers(size: Size, grid: int, batch: int, compile_mode: str | None = None) -> dict:
    """`our_samplers` and the peer's: its own generate() on random text embeddings."""
    fns = our_samplers(size, grid, batch, compile_mode)
    other = theirs(size, grid).eval()
    peer.feed_text(other, torch.randn(batch, size.text_len, size.dim),
                   torch.ones(batch, size.text_len, dtype=torch.bool))

    def peer_sample() -> torch.Tensor:
        return other.generate([""] * batch)

    return {**fns, "peer": peer_sample}
