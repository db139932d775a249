"""Reconstruction quality of a stage-1 tokenizer: PSNR, LPIPS, codebook usage, shapes judge.

    python -m parti.eval.tokenizer ckpt=outputs/demo/vqgan/export
    python -m parti.eval.tokenizer ckpt=<run>/checkpoints/step-0005000 shards='/data/val-{0..3}.tar' \
        samples=2048 perceptual_backbone=vgg perceptual_weights=/weights/vgg16.pth

The trainer's evaluation calls `reconstruction_sums` too, so both report the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import Tensor

from parti.data.eval_loader import build_eval_loader
from parti.data.shapes import parse_caption
from parti.data.shards import expand_urls
from parti.data.transforms import ImageDecoder
from parti.eval.metrics import codebook_usage, psnr
from parti.eval.shapes_judge import judge_counts
from parti.losses.perceptual import build_perceptual, lpips_distance
from parti.models.loading import load_image_tokenizer
from parti.models.vitvqgan import VitVQGAN


def is_shapes_caption(caption: str) -> bool:
    try:
        parse_caption(caption)
    except ValueError:
        return False
    return True


@torch.no_grad()
def reconstruction_sums(
    model: VitVQGAN,
    batches: Iterable[dict],
    perceptual: torch.nn.Module | None,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[dict[str, float], Tensor]:
    """Per-metric sums over the batches ("count" included) and per-code counts (K,).

    Sums rather than means, so ranks can add theirs before dividing. The shapes judge scores
    the reconstructions of batches whose captions are shapes captions.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"count": 0.0, "psnr": 0.0}
    counts = torch.zeros(model.quantizer.codebook_size, dtype=torch.float64, device=device)
    for batch in batches:
        images = batch["image"].to(device)
        with autocast():
            ids = model.encode(images)
            recon = model.decode(ids).float()
        n = float(len(images))
        counts += torch.bincount(ids.flatten(), minlength=len(counts)).to(counts)
        sums["count"] += n
        sums["psnr"] += float(psnr(images, recon).sum())
        if perceptual is not None:
            sums["lpips"] = sums.get("lpips", 0.0) + float(lpips_distance(perceptual, images,
                                                                          recon).sum())
        if all(is_shapes_caption(c) for c in batch["caption"]):
            for key, value in judge_counts(recon.cpu(), batch["caption"]).items():
                sums[f"judge_{key}"] = sums.get(f"judge_{key}", 0.0) + value
    model.train(was_training)
    return sums, counts


def summarize(sums: dict[str, float], counts: Tensor) -> dict[str, float]:
    """Means of the sums (a judge key over the images it applies to, its `_n`), plus codebook
    usage and perplexity."""
    n = max(sums["count"], 1.0)
    metrics = {key: value / sums.get(f"{key}_n", n) for key, value in sums.items()
               if key != "count" and not key.endswith("_n")}
    metrics["codebook_usage"], metrics["codebook_perplexity"] = codebook_usage(counts)
    return metrics


def limited(batches: Iterable[dict], limit: int) -> Iterable[dict]:
    """The first `limit` samples of a batch stream (the last batch cut to fit)."""
    seen = 0
    for batch in batches:
        if seen >= limit:
            return
        batch = {k: v[: limit - seen] for k, v in batch.items()}
        seen += len(batch["key"])
        yield batch


@dataclass
class EvalTokenizerConfig:
    ckpt: str = "outputs/demo/vqgan/export"
    shards: str = "data/shapes/eval-00000.tar"
    samples: int = 512
    batch_size: int = 64
    perceptual_backbone: str = "random"
    perceptual_weights: str | None = None


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = sys.argv[1:] if argv is None else argv
    cfg = OmegaConf.merge(OmegaConf.structured(EvalTokenizerConfig), OmegaConf.from_dotlist(args))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_image_tokenizer(cfg.ckpt, device)
    loader = build_eval_loader(expand_urls(cfg.shards), ImageDecoder(model.cfg.image_size, False),
                               batch_size=cfg.batch_size)
    perceptual = build_perceptual(cfg.perceptual_backbone, cfg.perceptual_weights).to(device)
    sums, counts = reconstruction_sums(model, limited(loader, cfg.samples), perceptual, device)
    metrics = summarize(sums, counts)
    print(f"{cfg.ckpt} on {int(sums['count'])} images of {cfg.shards} "
          f"(LPIPS backbone: {cfg.perceptual_backbone})")
    print(f"| {'metric':<22} | {'value':>8} |\n|{'-' * 24}|{'-' * 10}|")
    for key, value in sorted(metrics.items()):
        print(f"| {key:<22} | {value:8.4f} |")
    return metrics


if __name__ == "__main__":
    main()
