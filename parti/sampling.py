"""Text -> image tokens -> pixels: KV-cached, batched decoding with classifier-free guidance.

With guidance g != 1 each prompt is decoded together with the empty caption in one batch of 2B and
the logits are mixed as `uncond + g * (cond - uncond)` (g = 1 is plain conditional sampling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from parti.models.parti import Parti
from parti.models.vitvqgan import VitVQGAN
from parti.text.tokenizer import TextTokenizer


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (k = 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@torch.no_grad()
def sample_tokens(
    model: Parti,
    text_ids: Tensor,
    text_mask: Tensor,
    empty_ids: Tensor | None = None,
    empty_mask: Tensor | None = None,
    guidance: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Image tokens (B, N) for the captions (B, L); `empty_*` (1, L) is the unconditional caption."""
    batch = len(text_ids)
    guided = guidance != 1.0
    if guided:
        if empty_ids is None or empty_mask is None:
            raise ValueError("guidance != 1 needs the empty caption's ids and mask")
        text_ids = torch.cat([text_ids, empty_ids.expand(batch, -1)])
        text_mask = torch.cat([text_mask, empty_mask.expand(batch, -1)])
    memory = model.encode_text(text_ids, text_mask)  # (B or 2B, L, D)
    cache = model.new_cache(len(text_ids), like=memory)
    out = torch.zeros(batch, model.num_image_tokens, dtype=torch.long, device=text_ids.device)
    fed = None
    for position in range(model.num_image_tokens):
        logits = model.decode_step(fed, memory, text_mask, cache, position)[:, -1].float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance * (cond - uncond)
        logits = filter_top_k(logits / temperature, top_k)
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        out[:, position] = token[:, 0]
        fed = torch.cat([token, token]) if guided else token
    return out


@torch.no_grad()
def generate_images(
    model: Parti,
    text_tokenizer: TextTokenizer,
    image_tokenizer: VitVQGAN,
    prompts: list[str],
    guidance: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] for the prompts."""
    device = next(model.parameters()).device
    text_len = model.cfg.text_len
    ids, mask = text_tokenizer.encode(prompts, text_len)
    empty_ids, empty_mask = text_tokenizer.encode([""], text_len)
    tokens = sample_tokens(model, ids.to(device), mask.to(device), empty_ids.to(device),
                           empty_mask.to(device), guidance, temperature, top_k, generator)
    grid = image_tokenizer.grid
    return image_tokenizer.decode(tokens.view(-1, grid, grid)).float().clamp(-1, 1)
