"""Where the time of one benchmark row goes: torch.profiler's top operators for ours or the peer,
or (--by-kind, training only) the step's time split into matmuls, attention, optimizer and the rest.

    python -m bench.profile sample --grid 16 --batch 16          # ours, one guided sampling run
    python -m bench.profile train --grid 8 --batch 16 --who peer # the peer's training step
    python -m bench.profile sample --grid 16 --batch 1 --who compiled  # ours, compile=True
    python -m bench.profile sample --grid 16 --batch 1 --who compiled --compile-mode max-autotune
    python -m bench.profile train --grid 8 --batch 16 --kv-heads 1 --no-bias  # ours as the peer
    python -m bench.profile train --grid 8 --batch 16 --by-kind --warmup 15 --calls 8  # the floor
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench import stage2
from bench.timing import median, once, warm
from parti.training.perf import measured_matmul_flops

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION = ("flash_attention", "efficient_attention")  # fused kernels, forward and backward
OPTIMIZER = ("Optimizer.step#", "Optimizer.zero_grad#")  # whole optimizer calls, ops included


def _in_optimizer(event: Any) -> bool:
    """Whether a profiler event runs inside an optimizer call."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(OPTIMIZER):
            return True
        parent = parent.cpu_parent
    return False


def split_by_kind(events: Iterable[Any], calls: int) -> dict[str, float]:
    """Seconds per call from profiler events (torch's FunctionEvent: name, cpu_parent, self and
    total time in us, flops): matmul kernels with their FLOPs and fused attention kernels by self
    time; optimizer calls by their whole time (the peer's AdamW is a loop of small ops), each
    counted once: what runs inside an optimizer call is the optimizer's."""
    seconds = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0}
    flops = 0
    for event in events:
        if _in_optimizer(event):
            continue
        if event.name.startswith(OPTIMIZER):
            seconds["optimizer"] += event.cpu_time_total / 1e6
        elif event.name in MATMULS:
            seconds["matmul"] += event.self_cpu_time_total / 1e6
            flops += event.flops
        elif any(name in event.name for name in ATTENTION):
            seconds["attention"] += event.self_cpu_time_total / 1e6
    return {**{k: v / calls for k, v in seconds.items()}, "matmul_flops": flops / calls}


def by_kind(fn: Callable[[], object], calls: int, matmul_rate: float) -> dict[str, float]:
    """`split_by_kind` of `calls` profiled calls of `fn`, with `step`, its unprofiled median time;
    `rest`, the step less the three kinds (what the profiler adds to them, mostly to the small
    ops, makes it a slight underestimate); and `floor`, the matmuls at `matmul_rate` plus attention
    and optimizer as measured: the step if every other op were free."""
    times = [once(fn) for _ in range(calls)]
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(calls):
            fn()
    kinds = split_by_kind(prof.events(), calls)
    kinds["step"] = median(times)
    kinds["rest"] = kinds["step"] - kinds["matmul"] - kinds["attention"] - kinds["optimizer"]
    kinds["floor"] = kinds["matmul_flops"] / matmul_rate + kinds["attention"] + kinds["optimizer"]
    return kinds


def kind_table(kinds: dict[str, float], matmul_rate: float) -> str:
    """`by_kind`'s numbers as lines of text."""
    ms = {k: 1e3 * v for k, v in kinds.items() if k != "matmul_flops"}
    rate = kinds["matmul_flops"] / kinds["matmul"] if kinds["matmul"] else 0.0
    return "\n".join([
        f"step       {ms['step']:8.1f} ms (unprofiled median)",
        f"matmuls    {ms['matmul']:8.1f} ms  {kinds['matmul_flops'] / 1e9:.2f} GFLOP at "
        f"{rate / 1e9:.0f} GFLOP/s = {rate / matmul_rate:.0%} of the machine's "
        f"{matmul_rate / 1e9:.0f}",
        f"attention  {ms['attention']:8.1f} ms (fused kernels, forward + backward)",
        f"optimizer  {ms['optimizer']:8.1f} ms (step + zero_grad)",
        f"the rest   {ms['rest']:8.1f} ms (norms, activations, loss, copies, autograd, Python)",
        f"floor      {ms['floor']:8.1f} ms (matmuls at the machine's rate + attention + optimizer)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", choices=["train", "sample"])
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--who", choices=["ours", "compiled", "peer"], default="ours",
                        help="compiled: ours under torch.compile")
    parser.add_argument("--compile-mode", choices=["default", "max-autotune"], default="default",
                        help="sampling's compile_mode for --who compiled")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="ours with this many key/value heads (default: one per query head; "
                             "the peer always has one)")
    parser.add_argument("--no-bias", action="store_true",
                        help="ours without additive biases (model.bias=false; the peer has none)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--calls", type=int, default=1, help="calls profiled after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="calls before any timing")
    parser.add_argument("--by-kind", action="store_true",
                        help="time by kind (matmul, attention, optimizer, rest) and the floor")
    args = parser.parse_args()
    if args.by_kind and args.work != "train":
        parser.error("--by-kind splits a training step (compiled sampling's C++ GEMMs are no aten "
                     "matmuls it could count)")
    size = stage2.Size(kv_heads=args.kv_heads, bias=not args.no_bias)
    compiled = args.who == "compiled"
    if args.work == "train":
        fns = stage2.train_steps(size, args.grid, args.batch, compile=compiled)
    else:
        fns = stage2.samplers(size, args.grid, args.batch, args.compile_mode if compiled else None)
    fn = fns.get(args.who, fns["ours"])  # a compiled training step is the "ours" of train_steps
    warm(fn, seconds=0.0, calls=args.warmup)
    if args.by_kind:
        rate = measured_matmul_flops(torch.device("cpu"), seconds=1.0)
        print(kind_table(by_kind(fn, args.calls, rate), rate))
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
