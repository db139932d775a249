"""Per-GPU training memory of each Parti size under DDP and FSDP: `python -m parti.distributed.memory`.

A computed estimate, not a measurement. Assumptions (printed with the table): AdamW with fp32 weights,
gradients and two moments (16 bytes per parameter in all); bf16 activations; SDPA attention (no
stored score matrices); activations per layer from Korthikanti et al. 2022 (34 s b d bytes per
encoder layer, 47 for a decoder layer with cross-attention); fp32 logits and their gradient.
FSDP shards weights, gradients and moments over the GPUs and holds two gathered bf16 blocks in
flight (the running one and the prefetched one). Activation checkpointing keeps each block's input
(2 s b d bytes) and one block's full activations while it is recomputed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from parti.models.parti import Parti, PartiConfig

GB = 1e9
SIZES = ("parti_350m", "parti_750m", "parti_3b", "parti_20b")
ENCODER_BYTES, DECODER_BYTES = 34, 47  # activation bytes per (token x batch x width) of a layer


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def model_config(name: str) -> PartiConfig:
    """A size from conf/model/ as the schema object."""
    path = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{name}.yaml"
    node = OmegaConf.load(path)
    node = node.model if "model" in node else node  # the FSDP sizes are global-package files
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PartiConfig), node))


_COUNTED: dict[str, tuple[int, int]] = {}


def counts(cfg: PartiConfig) -> tuple[int, int]:
    """(all parameters, parameters of the largest block), counted on the meta device; kept per
    config, since building the model takes seconds and the table asks dozens of times a size."""
    key = repr(cfg)
    if key not in _COUNTED:
        with torch.device("meta"):
            model = Parti(cfg)
        block = max(sum(p.numel() for p in b.parameters()) for b in model.decoder)
        _COUNTED[key] = sum(p.numel() for p in model.parameters()), block
    return _COUNTED[key]


def activations(cfg: PartiConfig, micro_batch: int, checkpointing: bool) -> float:
    """Activation bytes of one micro-batch (see the module docstring)."""
    d, text, image = cfg.dim, cfg.text_len, cfg.image_grid**2
    encoder_layer = ENCODER_BYTES * text * micro_batch * d
    decoder_layer = DECODER_BYTES * image * micro_batch * d
    logits = 2 * 4 * micro_batch * image * cfg.codebook_size  # fp32 logits and their gradient
    if checkpointing:
        inputs = 2 * micro_batch * d * (text * cfg.enc_layers + image * cfg.dec_layers)
        return inputs + max(encoder_layer, decoder_layer) + logits
    return cfg.enc_layers * encoder_layer + cfg.dec_layers * decoder_layer + logits


def estimate(cfg: PartiConfig, gpus: int, strategy: str, micro_batch: int,
             checkpointing: bool) -> Estimate:
    params, block = counts(cfg)
    shards = gpus if strategy == "fsdp" else 1
    in_flight = 2 * 2 * block if strategy == "fsdp" else 0  # two gathered bf16 blocks
    return Estimate(weights=4 * params / shards + in_flight, gradients=4 * params / shards,
                    optimizer=8 * params / shards,
                    activations=activations(cfg, micro_batch, checkpointing))


def fewest_gpus(cfg: PartiConfig, micro_batch: int, memory: float, headroom: float = 0.9) -> int:
    """The smallest power-of-two FSDP world (with checkpointing) using <= headroom x memory."""
    gpus = 1
    while estimate(cfg, gpus, "fsdp", micro_batch, True).total > headroom * memory:
        gpus *= 2
        if gpus > 65536:
            raise ValueError(f"{cfg.name} does not fit in {memory / GB:g} GB at any GPU count")
    return gpus


def table(micro_batch: int = 8, gpu_memory_gb: float = 80.0) -> str:
    """The markdown table of the README (GB per GPU)."""
    rows = ["| model | params | strategy | GPUs | weights | grads | AdamW | act. | act. (AC) | "
            "total | total (AC) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fewest = []
    for name in SIZES:
        cfg = model_config(name)
        params, _ = counts(cfg)
        for strategy, gpus in (("ddp", 8), ("fsdp", 8), ("fsdp", 64)):
            plain = estimate(cfg, gpus, strategy, micro_batch, False)
            ac = estimate(cfg, gpus, strategy, micro_batch, True)
            rows.append(
                f"| {name} | {params / 1e9:.2f}B | {strategy} | {gpus} | {plain.weights / GB:.1f} | "
                f"{plain.gradients / GB:.1f} | {plain.optimizer / GB:.1f} | "
                f"{plain.activations / GB:.1f} | {ac.activations / GB:.1f} | "
                f"{plain.total / GB:.1f} | {ac.total / GB:.1f} |")
        n = fewest_gpus(cfg, micro_batch, gpu_memory_gb * GB)
        fewest.append(f"{name}: {n}")
    return "\n".join(rows) + (
        f"\n\nMicro-batch {micro_batch} per GPU. Fewest GPUs of {gpu_memory_gb:g} GB (FSDP, activation "
        f"checkpointing, <= 90% used): " + ", ".join(fewest) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    args = parser.parse_args()
    print(table(args.micro_batch, args.gpu_memory_gb))


if __name__ == "__main__":
    main()
