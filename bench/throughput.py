"""Stage-2 training throughput through the trainer's own step, for a lent GPU: one prepared run.

    python -m bench.throughput              # parti_350m, batch 8, bf16 on CUDA (~6 min on a GPU)
    python -m bench.throughput --model parti_tiny --steps 1 --compile off    # the tests' CPU run

Rows: `trainer.strategy=ddp` in one process (the plain module) and `fsdp` (fully_shard on one
device), each with `trainer.compile` off and on. The step is `OptimizerUnit.step`, as training runs
it (autocast, clipping, fused AdamW with its on-device skip of non-finite steps), on random text
and image tokens. Prints image tokens/s, model TFLOP/s, MFU against the device's peak (the known
bf16 peak of a GPU, the measured fp32 matmul rate of a CPU) and peak GPU memory as a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench.loop import compose_config
from parti import distributed
from parti.config import validate_parti
from parti.models.parti import Parti
from parti.training.perf import peak_flops
from parti.training.trainer import OptimizerUnit, start_run


def measure(model: str, strategy: str, compile_: bool, batch: int, steps: int,
            run_dir: Path) -> dict:
    """Seconds per step (after two warm-up steps, which include compilation) and peak memory."""
    cfg = compose_config("train_parti", [
        f"model={model}", f"trainer.strategy={strategy}", f"trainer.compile={compile_}",
        f"trainer.micro_batch={batch}", f"trainer.global_batch={batch}", "tokenizer.ckpt=unused",
        f"run_dir={run_dir}"])
    run = start_run(cfg, validate_parti)
    device = run.dist.device
    parti = Parti(OmegaConf.to_object(cfg.model))
    unit = OptimizerUnit(parti, run)
    m = cfg.model
    text = torch.randint(4, m.vocab_size, (batch, m.text_len), device=device)
    mask = torch.ones_like(text, dtype=torch.bool)
    tokens = torch.randint(0, m.codebook_size, (batch, m.image_grid**2), device=device)

    def loss_fn(model, batch_, index):
        logits = model(text, mask, tokens).float()
        return {"total": F.cross_entropy(logits.flatten(0, 1), tokens.flatten())}

    def step() -> None:
        unit.step([None], loss_fn)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    tokens_per_step = batch * m.image_grid**2
    return {"seconds": seconds, "tokens_per_s": tokens_per_step / seconds,
            "flops_per_s": parti.flops_per_token() * tokens_per_step / seconds,
            "memory_gb": memory / 1e9, "device": device, "precision": run.precision}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="parti_350m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            for compile_ in (c == "on" for c in args.compile):
                r = measure(args.model, strategy, compile_, args.batch, args.steps, Path(tmp))
                rows.append((strategy, compile_, r))
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    device = rows[0][2]["device"]
    peak = peak_flops(device, 0.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"{args.model}, batch {args.batch}, {rows[0][2]['precision']}, {name}; peak "
             f"{peak / 1e12:.1f} TFLOP/s; torch {torch.__version__}", "",
             "| strategy | torch.compile | step ms | image tok/s | TFLOP/s | MFU | peak GB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for strategy, compile_, r in rows:
        lines.append(f"| {strategy} | {'on' if compile_ else 'off'} | {1000 * r['seconds']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e12:.2f} | "
                     f"{r['flops_per_s'] / peak:.1%} | {r['memory_gb']:.1f} |")
    distributed.shutdown()
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
