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
    z_e: Tensor  # (B, N, code_dim) normalised encoder vectors, with gradients
    codes: Tensor  # (K, code_dim) normalised codebook, with gradients


_LOG_P_FLOOR = -80.0  # exp(-80) ~ 1.8e-35: still a normal float32


def code_entropy(z_e: Tensor, codes: Tensor, temperature: float, samples: int = 0
                 ) -> tuple[Tensor, Tensor]:
    """(mean per-vector entropy, entropy of the batch-mean) of softmax(cos(z_e, codes) / T), nats.

    Minimising the first while maximising the second (MAGVIT-v2's entropy penalty) makes each
    vector pick one code confidently while the batch spreads over the whole codebook: the
    pressure that keeps a small codebook from collapsing onto a few colours. `samples` > 0 scores
    that many randomly chosen vectors instead of all (the softmax over K codes dominates its cost).
    """
    with torch.autocast(z_e.device.type, enabled=False):
        flat = z_e.reshape(-1, z_e.shape[-1]).float()
        if 0 < samples < flat.shape[0]:
            flat = flat[torch.randperm(flat.shape[0], device=flat.device)[:samples]]
        log_p = (flat @ codes.float().T / temperature).log_softmax(dim=-1)  # (n, K)
        # Below log p ~ -87 float32 p underflows: exp() takes a slow path on the CPU (20x this
        # line's cost) and a code no vector is near gets mean_p = 0, whose xlogy gradient is NaN.
        # The floor changes p by < 1e-34.
        p = log_p.clamp_min(_LOG_P_FLOOR).exp()
        per_vector = -(p * log_p).sum(dim=-1).mean()
        mean_p = p.mean(dim=0)
        batch = -torch.special.xlogy(mean_p, mean_p).sum()
    return per_vector, batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class FactorizedQuantizer(nn.Module):
    """Linear dim -> code_dim, l2-normalised nearest-neighbour lookup, straight-through estimator.

    In training mode every forward adds its code counts (summed over ranks under
    torch.distributed, so every rank holds and checkpoints the same window and a resumed run takes
    the same restart decisions) to the current slot of a sliding window of `usage_window` slots
    (`advance_window()` starts the next one once per optimizer step; `usage()` reads them all) and
    keeps the batch's projected vectors in a ring
    of recent encoder outputs (`restart_dead_codes()` re-seeds unused codes from it, at most
    `restart_max_fraction` of the codebook per call). These and each code's `dead_for` count are
    buffers, so they are checkpointed with the model.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        usage_window: int = 100,
        restart_max_fraction: float = 0.25,
    ):
        super().__init__()
        if usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {usage_window}")
        if not 0 < restart_max_fraction <= 1:
            raise ValueError(f"restart_max_fraction must be in (0, 1], got {restart_max_fraction}")
        self.beta = beta
        # Codes re-seeded per restart: a cap lets the codebook settle instead of churning.
        self.restart_limit = max(1, int(restart_max_fraction * codebook_size))
        self.proj = nn.Linear(dim, code_dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        self.register_buffer("window_counts", torch.zeros(usage_window, codebook_size))
        self.register_buffer("window_pos", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent", torch.zeros(codebook_size, code_dim))
        self.register_buffer("recent_pos", torch.zeros((), dtype=torch.long))
        # Consecutive restart calls in which each code went unused (0 once used or re-seeded).
        self.register_buffer("dead_for", torch.zeros(codebook_size, dtype=torch.long))

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
            codes = self.normalized_codebook()  # (K, C), with gradients
            z_q = F.embedding(ids, codes)  # (B, N, C)
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
            z_e=z_e,
            codes=codes,
        )

    @torch.no_grad()
    def _record(self, z: Tensor, ids: Tensor) -> None:
        """Add this forward's code counts to the window's current slot; keep some of its vectors
        as recent."""
        window = self.window_counts.shape[0]
        counts = torch.bincount(ids.flatten(), minlength=self.codebook_size)
        if _distributed():
            dist.all_reduce(counts)  # global counts: every rank holds (and checkpoints) the same
        self.window_counts[self.window_pos % window] += counts.to(self.window_counts.dtype)
        flat = z.reshape(-1, z.shape[-1])  # (B*N, C)
        keep = min(flat.shape[0], self.recent.shape[0])
        rows = torch.randperm(flat.shape[0], device=flat.device)[:keep]
        slots = (self.recent_pos + torch.arange(keep, device=flat.device)) % self.recent.shape[0]
        self.recent[slots] = flat[rows].to(self.recent.dtype)
        self.recent_pos += keep

    @torch.no_grad()
    def advance_window(self) -> None:
        """Start the window's next slot, dropping the oldest: call once per optimizer step, so the
        window spans `usage_window` steps whatever the accumulation and world size."""
        self.window_pos += 1
        self.window_counts[self.window_pos % self.window_counts.shape[0]] = 0

    def _window_totals(self) -> Tensor:
        """Code counts (K,) summed over the window (already summed over ranks by `_record`)."""
        return self.window_counts.sum(dim=0)

    @torch.no_grad()
    def usage(self) -> dict[str, float]:
        """Fraction of codes used in the window and the perplexity exp(entropy) of their counts.

        Both are 0.0 for an empty window; the counts are those of all ranks.
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
        """Re-seed codes unused in the window from recent encoder outputs; reset the window.

        At most `restart_limit` codes per call, those unused for the most consecutive calls first
        (ties: lowest index), so codes that never won a vector go before ones that just went quiet.
        Returns the number re-seeded (0 when the window is empty: no evidence of dead codes).
        Under torch.distributed every rank holds the same counts and rank 0's new entries are
        broadcast: every rank takes the same decisions and runs the same collective, so call it on
        every rank.
        """
        totals = self._window_totals()
        restarted = 0
        if totals.sum() > 0:
            dead = totals == 0
            self.dead_for.add_(1).masked_fill_(~dead, 0)
            restarted = min(int(dead.sum()), self.restart_limit)
        if restarted:
            # Dead codes have dead_for >= 1 and live ones 0, so the first `restarted` are dead.
            order = torch.sort(self.dead_for, descending=True, stable=True).indices
            chosen = order[:restarted]
            new = self._seeds(restarted)
            if _distributed():
                dist.broadcast(new, src=0)
            self.codebook[chosen] = new.to(self.codebook.dtype)
            self.dead_for[chosen] = 0
        self.reset_usage()
        return restarted

    def _seeds(self, n: int) -> Tensor:
        """n new entries (n, code_dim): recent encoder outputs plus a little noise.

        Only rank 0's are used under torch.distributed; the other ranks return a receive buffer.
        """
        if _distributed() and dist.get_rank() != 0:
            return self.recent.new_empty(n, self.code_dim)
        filled = int(min(int(self.recent_pos), self.recent.shape[0]))
        device = self.recent.device
        if filled >= n:
            source = torch.randperm(filled, device=device)[:n]
        else:
            source = torch.randint(filled, (n,), device=device)
        return self.recent[source] + _RESTART_NOISE * torch.randn_like(self.recent[source])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept state saved before `dead_for` existed: every code then starts at 0."""
        state_dict.setdefault(prefix + "dead_for", torch.zeros_like(self.dead_for))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
