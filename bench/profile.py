"""Where the time of one benchmark row goes: torch.profiler's top operators for ours or the peer.

    python -m bench.profile sample --grid 16 --batch 16          # ours, one guided sampling run
    python -m bench.profile train --grid 8 --batch 16 --who peer # the peer's training step
    python -m bench.profile sample --grid 16 --batch 1 --who compiled  # ours, compile=True
    python -m bench.profile sample --grid 16 --batch 1 --who compiled --compile-mode max-autotune
    python -m bench.profile train --grid 8 --batch 16 --kv-heads 1     # ours, multi-query
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from bench import stage2


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
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--calls", type=int, default=1, help="calls profiled after the warm-up")
    args = parser.parse_args()
    size, compiled = stage2.Size(kv_heads=args.kv_heads), args.who == "compiled"
    if args.work == "train":
        fns = stage2.train_steps(size, args.grid, args.batch, compile=compiled)
    else:
        fns = stage2.samplers(size, args.grid, args.batch, args.compile_mode if compiled else None)
    fn = fns.get(args.who, fns["ours"])  # a compiled training step is the "ours" of train_steps
    for _ in range(2):  # warm-up
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
