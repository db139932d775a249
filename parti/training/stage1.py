"""Stage 1 on the shared trainer: ViT-VQGAN generator and discriminator, two optimizers.

Each step updates the generator on all micro-batches, then (once `loss.disc_start` is reached)
the discriminator on the same images and the generator's detached reconstructions. Before
`disc_start` no discriminator forward or backward runs at all; the generator's adversarial term
only starts `loss.disc_warmup` steps later and ramps in (`VQGANLoss.adversarial_scale`).
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from parti import distributed
from parti.config import to_container
from parti.data.eval_loader import build_eval_loader
from parti.data.pipeline import build_train_loader
from parti.data.shards import expand_urls
from parti.data.transforms import ImageDecoder
from parti.eval.tokenizer import reconstruction_sums, summarize
from parti.losses.vqgan import VQGANLoss
from parti.models.discriminator import Discriminator
from parti.models.vitvqgan import VitVQGAN, count_block_params
from parti.training.logging import RunLogger
from parti.training.trainer import OptimizerUnit, Run, Task

GRID_IMAGES = 8


class VQGANTask(Task):
    """Trains a ViT-VQGAN: reconstruction + perceptual + codebook losses, then the GAN terms."""

    def __init__(self, run: Run):
        self.run = run
        cfg = run.cfg
        self.model_cfg = OmegaConf.to_object(cfg.model)
        generator = VitVQGAN(self.model_cfg)
        disc = Discriminator(self.model_cfg.disc, self.model_cfg.image_size, self.model_cfg.channels)
        self.units = {"model": OptimizerUnit(generator, run), "disc": OptimizerUnit(disc, run)}
        self.loss = VQGANLoss(cfg.loss).to(run.device)
        self.disc_steps = 0
        self.disc_nonfinite = 0  # discriminator updates dropped for a non-finite gradient norm
        self._grid_batch: torch.Tensor | None = None

    @property
    def generator(self) -> VitVQGAN:
        return self.units["model"].module

    def train_loader(self, state: dict | None):
        cfg, dist = self.run.cfg, self.run.dist
        return build_train_loader(
            expand_urls(cfg.data.train_shards), ImageDecoder(cfg.data.image_size, train=True),
            batch_size=cfg.trainer.micro_batch, seed=cfg.trainer.seed, rank=dist.rank,
            world_size=dist.world_size, num_workers=cfg.data.num_workers,
            shards_per_block=cfg.data.shards_per_block, shuffle_buffer=cfg.data.shuffle_buffer,
            state=state)

    def _eval_batches(self):
        cfg, dist = self.run.cfg, self.run.dist
        loader = build_eval_loader(
            expand_urls(cfg.data.eval_shards), ImageDecoder(cfg.data.image_size, train=False),
            batch_size=cfg.trainer.micro_batch, rank=dist.rank, world_size=dist.world_size,
            max_samples=cfg.data.eval_samples)
        return iter(loader)

    def train_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        device = self.run.device
        images = [mb["image"].to(device, non_blocking=True) for mb in micro_batches]
        disc = self.units["disc"].module
        recons: list[torch.Tensor] = []

        def generator_loss(model: nn.Module, batch: torch.Tensor, index: int) -> dict:
            recon, quant = model(batch)
            recons.append(recon.detach())
            return self.loss.generator_loss(batch, recon, quant, step, disc,
                                            self.generator.last_layer)

        disc.requires_grad_(False)  # the generator's adversarial term must not train the critic
        scalars = self.units["model"].step(images, generator_loss)
        disc.requires_grad_(True)
        out = {f"train/{k}": v for k, v in scalars.items() if k != "skipped"}
        out["train/loss"] = out.pop("train/total")
        out["skipped"] = scalars["skipped"]
        if self.loss.gan_active(step):
            def disc_loss(critic: nn.Module, batch: torch.Tensor, index: int) -> dict:
                return self.loss.discriminator_loss(batch, recons[index], step, critic,
                                                    self.disc_steps)

            d = self.units["disc"].step(images, disc_loss)
            self.disc_steps += 1
            self.disc_nonfinite = self.disc_nonfinite + d["skipped"]  # on the device
            out.update({f"disc/{k}": v for k, v in d.items() if k != "skipped"})
        out.update(self._codebook_upkeep(step + 1))
        return out

    def _codebook_upkeep(self, done: int) -> dict[str, float]:
        """Usage statistics every usage_window steps; dead-code restart every restart_every.

        Restarts stop after step restart_until (when set) so the codebook can settle. `done` is
        the same on every rank, so every rank makes the same collective calls.
        """
        cfg, quantizer, out = self.model_cfg, self.generator.quantizer, {}
        if done % cfg.usage_window == 0:
            out.update({f"codebook/{k}": v for k, v in quantizer.usage().items()})
        restarting = not cfg.restart_until or done <= cfg.restart_until
        if cfg.restart_every and done % cfg.restart_every == 0 and restarting:
            out["codebook/restarted"] = float(quantizer.restart_dead_codes())
        quantizer.advance_window()
        return out

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """PSNR, LPIPS, codebook usage (and the shapes judge) of held-out reconstructions."""
        device = self.run.device
        sums, counts = reconstruction_sums(model, self._eval_batches(), self.loss.perceptual,
                                           device, self.run.autocast)
        sums = distributed.sum_dicts(sums, device)
        counts = distributed.all_reduce_sum(counts)
        return {f"eval/{k}": v for k, v in summarize(sums, counts).items()}

    @torch.no_grad()
    def log_images(self, model: nn.Module, logger: RunLogger, step: int) -> None:
        if self._grid_batch is None:
            first = next(self._eval_batches(), None)
            if first is None:
                return
            self._grid_batch = first["image"][:GRID_IMAGES].to(self.run.device)
        images, was_training = self._grid_batch, model.training
        model.eval()
        recon = model.decode(model.encode(images)).float()
        model.train(was_training)
        pairs = torch.stack([images, recon], dim=1).flatten(0, 1)  # (2N, 3, H, W): input, output
        logger.images("reconstructions/input_output", pairs, step, nrow=2 * 4)

    def export_config(self) -> dict:
        return {"kind": "vitvqgan", "model": to_container(self.run.cfg.model)}

    def samples_per_batch_flops(self) -> tuple[int, float]:
        """Tokens per image and 6 x (Transformer parameters) x tokens FLOPs per image."""
        tokens = self.generator.grid**2
        blocks = sum(count_block_params(self.model_cfg).values())
        return tokens, 6.0 * blocks * tokens

    def counters(self) -> dict[str, float]:
        if self.loss.cfg.adversarial_weight == 0:
            return {}
        return {"disc/nonfinite_steps": float(self.disc_nonfinite)}

    def extra_state(self) -> dict:
        return {"disc_steps": self.disc_steps, "disc_nonfinite": int(self.disc_nonfinite)}

    def load_extra_state(self, state: dict) -> None:
        self.disc_steps = state["disc_steps"]
        self.disc_nonfinite = state.get("disc_nonfinite", 0)  # absent before it was counted
