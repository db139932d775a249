"""Stage 2: the Parti encoder-decoder Transformer (text -> image tokens) with KV-cached decoding.

The text encoder is bidirectional over the padded caption; the image decoder is causal over the
raster-ordered image tokens of the stage-1 tokenizer and cross-attends to the encoder output.
Decoder input 0 is a learned start vector, input i > 0 the embedding of image token i - 1, so
output i predicts image token i. Sampling runs the same decoder one step at a time:

    memory = model.encode_text(text_ids, text_mask)
    cache = model.new_cache(batch, like=memory)
    tokens = None
    for position in range(model.num_image_tokens):
        logits = model.decode_step(tokens, memory, text_mask, cache, position)[:, -1]
        tokens = sample(logits)[:, None]  # (B, 1): image token `position`
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parti.models.layers import BlockCache, Position2d, TransformerBlock


@dataclass
class PartiConfig:
    """Hyperparameters of the encoder-decoder; the defaults are the tiny CPU size tests use."""

    name: str = "parti_tiny"  # size name, as in conf/model/<name>.yaml
    vocab_size: int = 512  # text vocabulary size (>= the SentencePiece model's; pad id 0)
    text_len: int = 32  # maximum number of text tokens (Parti: 128)
    codebook_size: int = 512  # image vocabulary = the stage-1 tokenizer's codebook (Parti: 8192)
    image_grid: int = 8  # image tokens per side = the tokenizer's grid (Parti: 32 -> 1024 tokens)
    dim: int = 128  # model width d (Parti: 1024 to 4096)
    enc_layers: int = 2  # text encoder blocks (Parti: 12 or 16)
    dec_layers: int = 2  # image decoder blocks (Parti: 12 to 64)
    heads: int = 4  # attention heads; must divide dim (Parti: head dim 64)
    kv_heads: int | None = None  # key/value heads, dividing heads (None: heads; 1: multi-query)
    mlp_dim: int = 512  # MLP hidden width (Parti: 4 * dim)
    dropout: float = 0.1  # attention, residual, MLP and embedding dropout (Parti: 0.1)
    text_dropout: float = 0.1  # chance of training on the empty caption (classifier-free guidance)
    tie_embeddings: bool = False  # share the image-token embedding with the output projection
    bias: bool = True  # additive biases in the linear layers and layer norms (False: none, as T5)
    init_std: float = 0.02  # std of the normal init of weights, image embeddings, positions (words: 1)


_POSITIVE_INTS = (
    "vocab_size",
    "text_len",
    "codebook_size",
    "image_grid",
    "dim",
    "enc_layers",
    "dec_layers",
    "heads",
    "mlp_dim",
)


def validate(cfg: PartiConfig) -> None:
    """Raise ValueError naming the key and its allowed range for any impossible value in `cfg`."""
    for key in _POSITIVE_INTS:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be an integer >= 1, got {value!r}")
    if cfg.vocab_size < 2:
        raise ValueError(f"model.vocab_size must be >= 2 (id 0 is padding), got {cfg.vocab_size}")
    if cfg.dim % cfg.heads:
        raise ValueError(f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})")
    kv = cfg.kv_heads
    if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1
                           or cfg.heads % kv):
        raise ValueError(
            f"model.kv_heads must be null or an integer >= 1 dividing model.heads ({cfg.heads}), "
            f"got {kv!r}"
        )
    for key in ("dropout", "text_dropout"):
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"model.{key} must be in [0, 1), got {value!r}")
    for key in ("tie_embeddings", "bias"):
        value = getattr(cfg, key)
        if not isinstance(value, bool):
            raise ValueError(f"model.{key} must be true or false, got {value!r}")
    if not cfg.init_std > 0.0:
        raise ValueError(f"model.init_std must be > 0, got {cfg.init_std!r}")


def _count(*modules: nn.Module) -> int:
    """Number of distinct parameters (tied weights once) in `modules`."""
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in params.values())


class Parti(nn.Module):
    """Encoder-decoder Transformer: a caption (B, L) and image tokens (B, N) -> logits (B, N, K)."""

    def __init__(self, cfg: PartiConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.num_image_tokens = cfg.image_grid**2
        d = cfg.dim

        self.text_emb = nn.Embedding(cfg.vocab_size, d, padding_idx=0)
        self.text_pos = nn.Parameter(torch.empty(cfg.text_len, d))
        self.encoder = nn.ModuleList(
            TransformerBlock(d, cfg.heads, cfg.mlp_dim, cfg.dropout, kv_heads=cfg.kv_heads,
                             bias=cfg.bias)
            for _ in range(cfg.enc_layers)
        )
        self.encoder_norm = nn.LayerNorm(d, bias=cfg.bias)

        self.start = nn.Parameter(torch.empty(d))
        self.image_emb = nn.Embedding(cfg.codebook_size, d)
        self.image_pos = Position2d(cfg.image_grid, cfg.image_grid, d, cfg.init_std)
        self.decoder = nn.ModuleList(
            TransformerBlock(
                d, cfg.heads, cfg.mlp_dim, cfg.dropout, cross_attention=True, causal=True,
                kv_heads=cfg.kv_heads, bias=cfg.bias,
            )
            for _ in range(cfg.dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(d, bias=cfg.bias)
        self.head = nn.Linear(d, cfg.codebook_size, bias=cfg.bias)
        if cfg.tie_embeddings:
            self.head.weight = self.image_emb.weight
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0, init_std) weights and embeddings, zero biases, scaled residual projections."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        # Word embeddings at unit scale (as T5): a caption's words stay distinct through the
        # pre-norm encoder from the first step, so cross-attention can find them early.
        nn.init.normal_(self.text_emb.weight, std=1.0)
        with torch.no_grad():  # zero the padding row again, as nn.Embedding(padding_idx=0) does
            self.text_emb.weight[0].zero_()
        nn.init.normal_(self.text_pos, std=std)
        nn.init.normal_(self.start, std=std)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * layers),
        # so the residual's variance does not grow with the depth of each stack.
        for blocks in (self.encoder, self.decoder):
            residual_std = std / math.sqrt(2 * len(blocks))
            for block in blocks:
                projections = [block.attn.proj, block.mlp.fc2]
                if block.cross_attn is not None:
                    projections.append(block.cross_attn.proj)
                for proj in projections:
                    nn.init.normal_(proj.weight, std=residual_std)

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Text ids (B, L) with mask (B, L), True = real token -> encoder output (B, L, D).

        Every caption needs at least one real token (an empty caption still encodes to e.g. EOS):
        attention over keys that are all padding has no defined result.
        """
        self._check_text(text_ids, text_mask)
        x = self.text_emb(text_ids) + self.text_pos[: text_ids.shape[1]]  # (B, L, D)
        x = self.drop(x)
        for block in self.encoder:
            x = block(x, mask=text_mask)
        return self.encoder_norm(x)

    def forward(self, text_ids: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """Teacher-forced logits (B, N, K): output i predicts image_tokens[:, i] from those < i."""
        self._check_image_tokens(image_tokens, text_ids.shape[0])
        memory = self.encode_text(text_ids, text_mask)
        x = self._decoder_inputs(image_tokens[:, :-1], 0, image_tokens.shape[0])  # (B, N, D)
        return self._decode(x, memory, text_mask)

    def new_cache(self, batch: int, like: Tensor) -> list[BlockCache]:
        """Empty KV caches, one per decoder block, for all N positions; dtype/device of `like`."""
        return [block.new_cache(batch, self.num_image_tokens, like) for block in self.decoder]

    def decode_step(
        self,
        tokens: Tensor | None,
        memory: Tensor,
        text_mask: Tensor,
        cache: list[BlockCache],
        position: int,
    ) -> Tensor:
        """Feed decoder inputs from `position` on through the KV cache; return logits (B, T', K).

        tokens: (B, T) the image tokens chosen last, i.e. tokens position - 1 .. position + T - 2,
        or None for the start step. At position 0 the start vector is put first, so T' = T + 1
        there (T' = 1 for tokens=None) and T' = T elsewhere; logits[:, t] predicts image token
        position + t. `position` is the number of inputs already in `cache`; memory (B, L, D) and
        text_mask (B, L) are those of `encode_text`.
        """
        if len(cache) != len(self.decoder):
            raise ValueError(f"cache has {len(cache)} blocks, the decoder {len(self.decoder)}")
        if position != cache[0].self_attn.length:
            raise ValueError(
                f"position {position} does not match the cache, which holds "
                f"{cache[0].self_attn.length} inputs"
            )
        if tokens is None:
            if position != 0:
                raise ValueError(f"tokens=None (the start step) needs position 0, got {position}")
        else:
            self._check_image_tokens(tokens, memory.shape[0], full=False)
        fed = (0 if tokens is None else tokens.shape[1]) + int(position == 0)
        if position + fed > self.num_image_tokens:
            raise ValueError(
                f"decode_step would feed inputs up to {position + fed}, "
                f"the image has {self.num_image_tokens} tokens"
            )
        x = self._decoder_inputs(tokens, position, memory.shape[0])  # (B, T', D)
        return self._decode(x, memory, text_mask, cache)

    def decode_fixed(self, tokens: Tensor, position: Tensor, cache: list[BlockCache]) -> Tensor:
        """Logits (B, K) of image token `position` from `tokens` (B, 1), image token position - 1.

        The same computation as `decode_step` for one token at position >= 1, with `position` a
        0-d long tensor and every shape the same at every position, so one torch.compile trace
        serves the whole image. Inference only; the cache must hold the inputs before `position`
        (a `decode_step` at position 0 fills it and the cross-attention keys/values); its `length`
        is not advanced (it stays where decode_step left it), so decode_step cannot continue after.
        Values are not checked here: the caller's loop feeds its own draws.
        """
        if self.training:
            raise RuntimeError("decode_fixed is for inference: call model.eval() first")
        if cache[0].cross_attn.k is None:
            raise ValueError("decode_fixed continues a decode: run decode_step at position 0 first")
        x = self.image_emb(tokens) + self.image_pos.at(position.view(1))  # (B, 1, D)
        for block, block_cache in zip(self.decoder, cache, strict=True):
            x = block.step(x, block_cache, position)
        return self.head(self.decoder_norm(x))[:, -1]

    def _decoder_inputs(self, tokens: Tensor | None, position: int, batch: int) -> Tensor:
        """Embedded decoder inputs (B, T', D) from `position` on: [start at 0] + embedded tokens."""
        parts = []
        if position == 0:
            parts.append(self.start.expand(batch, 1, -1))  # (B, 1, D)
        if tokens is not None:
            parts.append(self.image_emb(tokens))  # (B, T, D)
        x = torch.cat(parts, dim=1)
        x = x + self.image_pos.span(position, x.shape[1])
        return self.drop(x)

    def _decode(
        self,
        x: Tensor,
        memory: Tensor,
        text_mask: Tensor,
        cache: list[BlockCache] | None = None,
    ) -> Tensor:
        """Decoder blocks, final norm and output projection: (B, T, D) -> logits (B, T, K)."""
        for i, block in enumerate(self.decoder):
            block_cache = cache[i] if cache is not None else None
            x = block(x, context=memory, context_mask=text_mask, cache=block_cache)
        return self._logits(self.decoder_norm(x))

    def _logits(self, x: Tensor) -> Tensor:
        """The output projection (B, T, D) -> (B, T, K) as a tensor of its own, not a view: with a
        bias, nn.Linear on 3-D input returns a view of its 2-D product, and FSDP2 warns when a
        sharded root returns a view (an in-place edit of it would skip the gradient all-gather).
        `_unsafe_view`, what torch's matmul returns for the same reason, copies nothing."""
        logits = self.head(x)
        return torch.ops.aten._unsafe_view(logits, logits.shape)

    def _check_text(self, text_ids: Tensor, text_mask: Tensor) -> None:
        """Raise ValueError for text ids or a mask of a shape or dtype the encoder cannot take."""
        if text_ids.ndim != 2 or text_ids.dtype != torch.long:
            raise ValueError(
                f"text_ids must be a (B, L) long tensor, "
                f"got {tuple(text_ids.shape)} {text_ids.dtype}"
            )
        if text_mask.shape != text_ids.shape or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be a bool tensor shaped like text_ids {tuple(text_ids.shape)}, "
                f"got {tuple(text_mask.shape)} {text_mask.dtype}"
            )
        if text_ids.shape[1] > self.cfg.text_len:
            raise ValueError(
                f"text has {text_ids.shape[1]} tokens, model.text_len is {self.cfg.text_len}"
            )

    def check_text_values(self, text_ids: Tensor, text_mask: Tensor) -> None:
        """Raise ValueError for ids outside the vocabulary or a caption without a real token.

        This and `check_token_values` scan values, so the data path calls them on CPU tensors:
        the forward pass checks shapes only and never waits on the device.
        """
        if bool(((text_ids < 0) | (text_ids >= self.cfg.vocab_size)).any()):
            raise ValueError(f"text_ids must lie in [0, model.vocab_size={self.cfg.vocab_size})")
        if not bool(text_mask.any(dim=1).all()):
            raise ValueError(
                "a caption has no real token (text_mask all False): encode the empty caption "
                "to at least one token, e.g. EOS"
            )

    def check_token_values(self, image_tokens: Tensor) -> None:
        """Raise ValueError for image tokens outside the codebook (see `check_text_values`)."""
        if bool(((image_tokens < 0) | (image_tokens >= self.cfg.codebook_size)).any()):
            raise ValueError(
                f"image tokens must lie in [0, model.codebook_size={self.cfg.codebook_size})"
            )

    def _check_image_tokens(self, tokens: Tensor, batch: int, full: bool = True) -> None:
        """Raise ValueError for image tokens of the wrong shape, batch or (full=True, teacher
        forcing) length; values are the data path's to check (`check_token_values`)."""
        if tokens.ndim != 2 or tokens.dtype != torch.long or tokens.shape[0] != batch:
            raise ValueError(
                f"image tokens must be a ({batch}, N) long tensor, "
                f"got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if full and tokens.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"got {tokens.shape[1]} image tokens, model.image_grid={self.cfg.image_grid} "
                f"needs {self.num_image_tokens}: does the tokenizer's grid match?"
            )

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding counts the Transformer stacks only, as the paper does.

        The paper's 350M..20B count blocks alone (12 d^2 per encoder layer, 16 d^2 per decoder
        layer); non_embedding therefore leaves out embeddings, positions, the start vector and
        the output projection (vocabulary-sized, like an embedding), keeping blocks and final norms.
        """
        if non_embedding:
            return _count(self.encoder, self.encoder_norm, self.decoder, self.decoder_norm)
        return _count(self)

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per image token, nanoGPT-style estimate.

        6 FLOPs per weight per token for the matmuls, plus 12 * d per (query, key) pair for the
        attention scores and weighted sums (full key length, causality not halved, as nanoGPT).
        The text side (encoder, cross-attention keys/values) runs once per caption of text_len
        tokens and is amortised over the N image tokens.
        """
        n, text_len, d = self.num_image_tokens, self.cfg.text_len, self.cfg.dim
        cross_kv = _count(*(block.cross_attn.to_kv for block in self.decoder))
        per_image_token = _count(self.decoder, self.decoder_norm, self.head) - cross_kv
        per_text_token = _count(self.encoder, self.encoder_norm) + cross_kv
        matmul = 6 * (per_image_token + per_text_token * text_len / n)
        attention = (
            12
            * d
            * (self.cfg.dec_layers * (n + text_len) + self.cfg.enc_layers * text_len * text_len / n)
        )
        return float(matmul + attention)
