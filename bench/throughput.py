"""Stage-2 training throughput through the trainer's own step, for a lent GPU: one prepared run.

    python -m bench.throughput              # parti_350m, batch 32, bf16 on CUDA (~2 min on an H200)
    python -m bench.throughput --batch 32 --strategy ddp --compile off --profile 3  # + top kernels
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
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.loop import compose_config
from parti import distributed
from parti.config import validate_parti
from parti.models.parti import Parti
from parti.training.perf import measured_matmul_flops, peak_flops
from parti.training.trainer import OptimizerUnit, start_run


def measure(model: str, strategy: str, compile_: bool, batch: int, steps: int,
            run_dir: Path, profile_steps: int = 0) -> dict:
    """Seconds per step (after two warm-up steps, which include compilation) and peak memory;
    with `profile_steps`, then prints where the time of that many more steps goes."""
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
    if profile_steps:
        print_profile(step, profile_steps, device, f"{strategy}, compile {compile_}")
    tokens_per_step = batch * m.image_grid**2
    return {"seconds": seconds, "tokens_per_s": tokens_per_step / seconds,
            "flops_per_s": parti.flops_per_token() * tokens_per_step / seconds,
            "memory_gb": memory / 1e9, "device": device, "precision": run.precision,
            "peak": peak_flops(device, 0.0), "measured": matmul_rate(device)}


def print_profile(step, steps: int, device: torch.device, title: str) -> None:
    """torch.profiler over `steps` steps: the top operators by device time (by CPU time on a CPU)
    and the device's own time a step (its kernels'), to set against the step time: a step much
    longer than its kernels is bound by the host (Python, launches), not by the device."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    if cuda:  # the kernels alone: an operator's self device time repeats its kernels'
        busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    else:
        busy = sum(e.self_cpu_time_total for e in events)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile of {title}: {steps} steps; {'kernels' if cuda else 'operators'} "
          f"{busy / 1e3 / steps:.1f} ms a step, {1000 * wall / steps:.1f} ms a step under the "
          "profiler", flush=True)
    print(events.table(sort_by=key, row_limit=15), flush=True)


def matmul_rate(device: torch.device) -> float:
    """The measured matmul rate in the precision training runs at: bf16 8192^3 on CUDA (the MFU
    a GPU can reach, below its datasheet peak), fp32 1024^3 on the CPU."""
    if device.type != "cuda":
        return measured_matmul_flops(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, count = time.perf_counter(), 10
    for _ in range(count):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * 8192**3 * count / (time.perf_counter() - start)


def header(args: argparse.Namespace, r: dict) -> list[str]:
    """The table's title line (model, batch, precision, device, both rates) and column heads."""
    device = r["device"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return [f"{args.model}, batch {args.batch}, {r['precision']}, {name}; peak "
            f"{r['peak'] / 1e12:.1f} TFLOP/s, measured matmul rate {r['measured'] / 1e12:.1f} "
            f"TFLOP/s; torch {torch.__version__}", "",
            "| strategy | torch.compile | step ms | image tok/s | TFLOP/s | MFU (peak) | "
            "MFU (measured) | peak GB |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="parti_350m")
    parser.add_argument("--batch", type=int, default=32)  # train_parti.yaml's micro-batch
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--strategy", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after each row, print torch.profiler's top operators over STEPS steps")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def emit(line: str) -> None:
        """Print each line as it is known, so a run cut short still shows its finished rows."""
        lines.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for compile_ in (c == "on" for c in args.compile):  # eager rows first: they take seconds
            for strategy in args.strategy:
                r = measure(args.model, strategy, compile_, args.batch, args.steps, Path(tmp),
                            args.profile)
                if not lines:
                    for line in header(args, r):
                        emit(line)
                emit(f"| {strategy} | {'on' if compile_ else 'off'} | {1000 * r['seconds']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e12:.2f} | "
                     f"{r['flops_per_s'] / r['peak']:.1%} | {r['flops_per_s'] / r['measured']:.1%} | "
                     f"{r['memory_gb']:.1f} |")
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    distributed.shutdown()
    return "\n".join(lines)


if __name__ == "__main__":
    main()
