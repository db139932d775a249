"""Factorized, l2-normalised vector quantizer (ViT-VQGAN), usage statistics, dead-code restarts.

Encoder vectors are projected to a small code dimension and l2-normalised, as are the codebook
entries, so the nearest neighbour is the entry of highest cosine similarity. The projection back up
to the decoder width lives in the decoder (`ViTDecoder.code_embed`), so that decoding from ids only
needs the codebook and the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Rows per nearest-neighbour matmul: bounds the (rows, codebook) similarity matrix's memory.
_LOOKUP_CHUNK = 8192
# Noise added to re-seeded codes so that codes seeded from the same vector do not tie.
_RESTART_NOISE = 1e-3


@dataclass
class QuantizerOutput:
    """What the quantizer returns for a batch of encoder vectors."""

    quantized: Tensor  # (B, N, code_dim) codes with a straight-through gradient to the encoder
    ids: Tensor  # (B, N) long: index of each code in the codebook
    loss: Tensor  # codebook_loss + beta * commitment_loss: the term to add to the training loss
    codebook_loss: Tensor  # ||sg(z_e) - z_q||^2: moves the codebook towards the encoder outputs
    commitment_loss: Tensor  # ||z_e - sg(z_q)||^2 (unweighted): moves the encoder towards its codes


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class FactorizedQuantizer(nn.Module):
    """Linear dim -> code_dim, l2-normalised nearest-neighbour lookup, straight-through estimator.

    In training mode every forward adds its code counts to a sliding window of the last
    `usage_window` forwards (`usage()` reads it) and keeps the batch's projected vectors in a ring
    of recent encoder outputs (`restart_dead_codes()` re-seeds unused codes from it). Both are
    buffers, so they are checkpointed with the model.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        usage_window: int = 100,
    ):
        super().__init__()
        if usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {usage_window}")
        self.beta = beta
        self.proj = nn.Linear(dim, code_dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        self.register_buffer("window_counts", torch.zeros(usage_window, codebook_size))
        self.register_buffer("window_pos", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent", torch.zeros(codebook_size, code_dim))
        self.register_buffer("recent_pos", torch.zeros((), dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def code_dim(self) -> int:
        return self.codebook.shape[1]

    def project(self, h: Tensor) -> Tensor:
        """Encoder vectors (B, N, dim) -> l2-normalised fp32 vectors z_e (B, N, code_dim)."""
        with torch.autocast(h.device.type, enabled=False):
            return F.normalize(self.proj(h.float()), dim=-1)

    def normalized_codebook(self) -> Tensor:
        """The codebook entries on the unit sphere, fp32 (K, code_dim)."""
        return F.normalize(self.codebook.float(), dim=-1)

    def nearest(self, z: Tensor) -> Tensor:
        """Ids (B, N) of the codes most cosine-similar to normalised vectors z (B, N, C)."""
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            codes = self.normalized_codebook()
            flat = z.reshape(-1, z.shape[-1]).float()  # (B*N, C)
            ids = [(chunk @ codes.T).argmax(dim=-1) for chunk in flat.split(_LOOKUP_CHUNK)]
        return torch.cat(ids).view(z.shape[:-1])

    def embed(self, ids: Tensor) -> Tensor:
        """Codes (..., code_dim) of the ids (...): normalised codebook rows."""
        return F.embedding(ids, self.normalized_codebook())

    def forward(self, h: Tensor) -> QuantizerOutput:
        """Quantize encoder vectors h (B, N, dim); in training mode also record usage statistics."""
        with torch.autocast(h.device.type, enabled=False):
            z_e = self.project(h)  # (B, N, C)
            ids = self.nearest(z_e)  # (B, N)
            z_q = self.embed(ids)  # (B, N, C)
            codebook_loss = F.mse_loss(z_q, z_e.detach())
            commitment_loss = F.mse_loss(z_e, z_q.detach())
            quantized = z_e + (z_q - z_e).detach()
        if self.training:
            self._record(z_e.detach(), ids)
        return QuantizerOutput(
            quantized=quantized,
            ids=ids,
            loss=codebook_loss + self.beta * commitment_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    @torch.no_grad()
    def _record(self, z: Tensor, ids: Tensor) -> None:
        """Add this forward's code counts to the window; keep some of its vectors as recent."""
        window = self.window_counts.shape[0]
        counts = torch.bincount(ids.flatten(), minlength=self.codebook_size)
        self.window_counts[self.window_pos % window] = counts.to(self.window_counts.dtype)
        self.window_pos += 1
        flat = z.reshape(-1, z.shape[-1])  # (B*N, C)
        keep = min(flat.shape[0], self.recent.shape[0])
        rows = torch.randperm(flat.shape[0], device=flat.device)[:keep]
        slots = (self.recent_pos + torch.arange(keep, device=flat.device)) % self.recent.shape[0]
        self.recent[slots] = flat[rows].to(self.recent.dtype)
        self.recent_pos += keep

    def _window_totals(self) -> Tensor:
        """Code counts (K,) summed over the window and, under torch.distributed, over ranks."""
        totals = self.window_counts.sum(dim=0)
        if _distributed():
            dist.all_reduce(totals)
        return totals

    @torch.no_grad()
    def usage(self) -> dict[str, float]:
        """Fraction of codes used in the window and the perplexity exp(entropy) of their counts.

        Both are 0.0 for an empty window. Collective under torch.distributed: call on every rank.
        """
        totals = self._window_totals()
        total = totals.sum()
        if total == 0:
            return {"usage": 0.0, "perplexity": 0.0}
        p = totals / total
        entropy = -torch.special.xlogy(p, p).sum()
        return {"usage": (totals > 0).float().mean().item(), "perplexity": entropy.exp().item()}

    def reset_usage(self) -> None:
        """Start a new, empty usage window."""
        self.window_counts.zero_()
        self.window_pos.zero_()

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Re-seed every code unused in the window from recent encoder outputs; reset the window.

        Returns the number of codes re-seeded (0 before any training forward). Under
        torch.distributed the counts are summed over ranks first and rank 0's new entries are
        broadcast, so every rank keeps the same codebook: call it on every rank.
        """
        dead = (self._window_totals() == 0).nonzero().squeeze(1)  # (D,)
        filled = int(min(int(self.recent_pos), self.recent.shape[0]))
        restarted = 0
        if len(dead) and filled:
            if filled >= len(dead):
                source = torch.randperm(filled, device=dead.device)[: len(dead)]
            else:
                source = torch.randint(filled, (len(dead),), device=dead.device)
            new = self.recent[source] + _RESTART_NOISE * torch.randn_like(self.recent[source])
            if _distributed():
                dist.broadcast(new, src=0)
            self.codebook[dead] = new.to(self.codebook.dtype)
            restarted = len(dead)
        self.reset_usage()
        return restarted
