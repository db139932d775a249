"""Training-step throughput of each stage's model (forward + backward + AdamW step), as a table.

    python bench/throughput.py                     # tiny configs on this machine's device
    python bench/throughput.py --models parti_350m --batch 8 --precision bf16   # on a GPU

MFU = model FLOPs per second / the device peak (the known bf16 peak of a GPU, or the measured fp32
matmul rate of a CPU: the ceiling an fp32 CPU run can reach).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from parti.models.parti import Parti, PartiConfig
from parti.models.vitvqgan import VitVQGAN, VitVQGANConfig, count_block_params
from parti.training.perf import peak_flops
from parti.training.precision import autocast_factory

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


def model_config(name: str):
    schema = PartiConfig if name.startswith("parti") else VitVQGANConfig
    node = OmegaConf.load(CONF / f"{name}.yaml")
    node = node.model if "model" in node else node  # parti_3b/20b are global-package files
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.to_object(merged)


def build(name: str, batch: int, device: torch.device):
    """(model, loss closure, tokens per sample, FLOPs per sample)."""
    cfg = model_config(name)
    if isinstance(cfg, PartiConfig):
        model = Parti(cfg).to(device)
        n = cfg.image_grid**2
        text = torch.randint(4, cfg.vocab_size, (batch, cfg.text_len), device=device)
        mask = torch.ones_like(text, dtype=torch.bool)
        tokens = torch.randint(0, cfg.codebook_size, (batch, n), device=device)

        def loss() -> torch.Tensor:
            logits = model(text, mask, tokens).float()
            return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())

        return model, loss, n, model.flops_per_token() * n
    model = VitVQGAN(cfg).to(device)
    images = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    n = (cfg.image_size // cfg.patch_size) ** 2

    def loss() -> torch.Tensor:
        recon, quant = model(images)
        return F.mse_loss(recon.float(), images) + quant.loss

    return model, loss, n, 6.0 * sum(count_block_params(cfg).values()) * n


def bench(name: str, batch: int, precision: str, device: torch.device, steps: int) -> dict:
    model, loss_fn, tokens, flops = build(name, batch, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = autocast_factory(precision, device)

    def step() -> None:
        with autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"model": name, "batch": batch, "precision": precision, "step_ms": 1000 * seconds,
            "samples_per_s": batch / seconds, "tokens_per_s": batch * tokens / seconds,
            "tflops": batch * flops / seconds / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vitvqgan_tiny", "parti_tiny"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    peak = peak_flops(device, 0.0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f", {torch.get_num_threads()} threads), peak {peak / 1e12:.3f} TFLOP/s")
    print("| model | batch | precision | step ms | samples/s | tokens/s | TFLOP/s | MFU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = bench(name, args.batch, precision, device, args.steps)
        print(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['step_ms']:.1f} | "
              f"{r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.3f} | "
              f"{r['tflops'] * 1e12 / peak:.1%} |")


if __name__ == "__main__":
    main()
