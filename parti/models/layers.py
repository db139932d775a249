"""Transformer building blocks shared by every model: attention with a KV cache, MLP, blocks, positions.

There is one attention module in the project. It does self- and cross-attention through
`F.scaled_dot_product_attention` and, given a `KVCache`, incremental decoding: self-attention keys and
values grow one step at a time in a preallocated buffer; cross-attention keys and values are computed
from the context once and reused. `step` is the same decoding step with fixed shapes (the whole
buffer, later slots masked) for torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class KVCache:
    """Keys and values of one attention layer, (B, kv_heads, S, Dh) each; `length` slots filled.

    `mask` is the cross-attention key mask (B, 1, 1, S) built on the first call and reused by the
    decoding steps after it (None: every key is attended).
    """

    k: Tensor | None = None
    v: Tensor | None = None
    length: int = 0
    mask: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (e.g. to drop finished or duplicated samples)."""
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]
        if self.mask is not None:
            self.mask = self.mask[index]


@dataclass
class BlockCache:
    """The caches of one Transformer block: its self-attention and (optional) cross-attention."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


def _merge_masks(
    key_mask: Tensor | None, causal_offset: int | None, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """Boolean attention mask (B or 1, 1, Q, K), True = attend, from a key padding mask and/or causality.

    `causal_offset` is the absolute position of the first query: query i may see keys j <= offset + i.
    When the first query already sees every key (one decoding step), causality masks nothing and
    no mask is built for it.
    """
    mask = None
    if causal_offset is not None and causal_offset < k_len - 1:
        q_pos = torch.arange(q_len, device=device)[:, None] + causal_offset
        mask = (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, Q, K)
    if key_mask is not None:
        pad = key_mask[:, None, None, :].bool()  # (B, 1, 1, K)
        mask = pad if mask is None else mask & pad
    return mask


class Attention(nn.Module):
    """Multi-head attention: self-attention when `context` is None, cross-attention otherwise.

    `kv_heads` key/value heads (default `heads`) are shared by groups of heads // kv_heads query
    heads: 1 is multi-query attention (Shazeer 2019), in between grouped-query attention. Fewer
    key/value heads shrink the key/value projections and the KV cache that decoding reads per token.
    `bias=False` drops the projections' additive biases (as T5).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, context_dim: int | None = None,
                 kv_heads: int | None = None, bias: bool = True):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"attention heads {heads} are not divisible by kv_heads {kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(context_dim or dim, 2 * kv_heads * self.head_dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, t: Tensor, heads: int) -> Tensor:
        """(B, T, heads * Dh) -> (B, heads, T, Dh), a view."""
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    def _keys_values(self, src: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.to_kv(src).chunk(2, dim=-1)
        return self._heads(k, self.kv_heads), self._heads(v, self.kv_heads)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, T, D) queries; context: (B, S, Dc) or None; key_mask: (B, S or T), True = real token.

        With a cache, self-attention appends this call's T keys/values after the cached ones (the
        buffer must have been allocated by `allocate_self_cache`); cross-attention computes the
        context's keys/values on the first call and reuses them afterwards.
        """
        q = self._heads(self.to_q(x), self.heads)  # (B, H, T, Dh)
        offset, mask = None, None
        if context is not None:
            if cache is not None and cache.length > 0:
                k, v, mask = cache.k, cache.v, cache.mask
            else:
                k, v = self._keys_values(context)
                mask = _merge_masks(key_mask, None, q.shape[2], k.shape[2], q.device)
                if cache is not None:
                    cache.k, cache.v, cache.length, cache.mask = k, v, k.shape[2], mask
        elif cache is not None:
            k_new, v_new = self._keys_values(x)
            start, end = cache.length, cache.length + x.shape[1]
            if end > cache.k.shape[2]:
                raise ValueError(f"KV cache holds {cache.k.shape[2]} positions, step needs {end}")
            cache.k[:, :, start:end] = k_new
            cache.v[:, :, start:end] = v_new
            cache.length = end
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
            offset = start if causal else None
        else:
            k, v = self._keys_values(x)
            offset = 0 if causal else None
        dropout = self.dropout if self.training else 0.0
        grouped = self.kv_heads != self.heads
        if offset == 0 and key_mask is None and q.shape[2] == k.shape[2]:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                 enable_gqa=grouped)
        else:
            if context is None:
                mask = _merge_masks(key_mask, offset, q.shape[2], k.shape[2], q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 enable_gqa=grouped)
        return self.proj(out.transpose(1, 2).flatten(2))

    def step(self, x: Tensor, cache: KVCache, position: Tensor | None) -> Tensor:
        """One decoding step with the same shapes at every position: torch.compile traces it once.

        x: (B, 1, D). Self-attention (`position` a 0-d long tensor): this step's key/value go into
        slot `position` of the preallocated cache and the query attends to the slots <= position of
        the whole buffer; `cache.length` is left to the caller (an int that changed each step would
        be traced as a constant). Cross-attention (`position` None): the keys/values `forward`
        cached. Attention is written out (two small matmuls and a softmax) for the compiler to fuse:
        at one query a fused kernel call costs more than its arithmetic. The query heads of a
        key/value head are its rows: q is (B, kv_heads, heads // kv_heads, Dh).
        """
        q = self.to_q(x)[:, 0].unflatten(-1, (self.kv_heads, -1, self.head_dim))  # (B, Hkv, G, Dh)
        if position is None:
            k, v, visible = cache.k, cache.v, cache.mask
        else:
            k_new, v_new = self._keys_values(x)
            slot = position.view(1)
            cache.k.index_copy_(2, slot, k_new.to(cache.k.dtype))
            cache.v.index_copy_(2, slot, v_new.to(cache.v.dtype))
            k, v = cache.k, cache.v
            visible = torch.arange(k.shape[2], device=x.device) <= position  # (S,)
        scores = (q @ k.transpose(-1, -2).to(q.dtype)) * q.shape[-1] ** -0.5  # (B, Hkv, G, S)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        out = scores.softmax(-1) @ v.to(q.dtype)  # (B, Hkv, G, Dh)
        return self.proj(out.flatten(1)[:, None])

    def allocate_self_cache(self, batch: int, max_len: int, like: Tensor) -> KVCache:
        """An empty self-attention cache for `max_len` positions, dtype/device of `like`."""
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        buf = dict(dtype=like.dtype, device=like.device)
        return KVCache(torch.zeros(shape, **buf), torch.zeros(shape, **buf), 0)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a context, MLP; residual dropout.

    `kv_heads` (default `heads`) applies to both attentions (see `Attention`); `bias=False` drops
    the additive biases of every linear layer and layer norm."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        cross_attention: bool = False,
        causal: bool = False,
        kv_heads: int | None = None,
        bias: bool = True,
    ):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim, bias=bias)
        self.attn = Attention(dim, heads, dropout, kv_heads=kv_heads, bias=bias)
        self.cross_norm = nn.LayerNorm(dim, bias=bias) if cross_attention else None
        self.cross_attn = (
            Attention(dim, heads, dropout, kv_heads=kv_heads, bias=bias) if cross_attention else None
        )
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = MLP(dim, mlp_dim, dropout, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: BlockCache | None = None,
    ) -> Tensor:
        """x: (B, T, D); mask: (B, T) key padding of x; context: (B, S, D) with context_mask (B, S)."""
        self_cache = cache.self_attn if cache is not None else None
        x = x + self.drop(self.attn(self.norm1(x), key_mask=mask, causal=self.causal, cache=self_cache))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block cross-attends: pass a context")
            cross_cache = cache.cross_attn if cache is not None else None
            h = self.cross_attn(self.cross_norm(x), context, key_mask=context_mask, cache=cross_cache)
            x = x + self.drop(h)
        return x + self.drop(self.mlp(self.norm2(x)))

    def step(self, x: Tensor, cache: BlockCache, position: Tensor) -> Tensor:
        """One fixed-shape decoding step (`Attention.step`) at `position`; x: (B, 1, D), inference."""
        x = x + self.attn.step(self.norm1(x), cache.self_attn, position)
        if self.cross_attn is not None:
            x = x + self.cross_attn.step(self.cross_norm(x), cache.cross_attn, None)
        return x + self.mlp(self.norm2(x))

    def new_cache(self, batch: int, max_len: int, like: Tensor) -> BlockCache:
        """An empty cache for decoding up to `max_len` positions of this block."""
        return BlockCache(self_attn=self.attn.allocate_self_cache(batch, max_len, like))


class Position2d(nn.Module):
    """Learned factorised 2D positional embedding: row(y) + column(x), for an (h, w) grid."""

    def __init__(self, height: int, width: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(height, 1, dim) * init_std)
        self.cols = nn.Parameter(torch.randn(1, width, dim) * init_std)

    def forward(self) -> Tensor:
        """All positions in raster order: (h * w, D)."""
        return rearrange(self.rows + self.cols, "h w d -> (h w) d")

    def span(self, start: int, length: int) -> Tensor:
        """Raster positions start .. start + length - 1: (length, D), the same rows as
        `forward()[start : start + length]` without building the whole table (decoding steps)."""
        width = self.cols.shape[1]
        if length >= self.rows.shape[0] * width:
            return self.forward()[start : start + length]
        return self.at(torch.arange(start, start + length, device=self.rows.device))

    def at(self, index: Tensor) -> Tensor:
        """The embeddings (L, D) of the raster positions in the long tensor `index` (L,)."""
        width = self.cols.shape[1]
        return self.rows[index // width, 0] + self.cols[0, index % width]
