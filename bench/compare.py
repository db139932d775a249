"""`make bench`: one table of parti against the public parti-pytorch (PyPI 0.2.0), in one process.

    python -m bench.compare                             # print the table (under 10 min, 2-core CPU)
    python -m bench.compare --results bench/RESULTS.md  # and keep it with the date

Stage-2 training and sampling, stage-1 training, and the whole loop (shard loader, trainer) of
both demo models. Contenders of a row run in alternating rounds, so machine load hits both; the
ratios are from this one run. MFU is against the fp32 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import loop, stage1, stage2
from bench.table import Row, markdown
from bench.timing import interleaved, median, once, speedup
from parti.training.perf import measured_matmul_flops

PEER_WARM_LIMIT = 4096  # image tokens per sampling call below which the peer gets a warm-up call


@dataclass
class Plan:
    """Sizes and time budgets of one run (the full one, or a toy one for tests)."""

    s2: stage2.Size = field(default_factory=stage2.Size)
    train: tuple[tuple[int, int], ...] = ((8, 16), (16, 8))  # (grid, batch)
    compile: bool = True  # also train and sample ours under torch.compile (both ways in the table)
    peer_layout: bool = True  # also ours with the peer's layout: one key/value head, no biases
    sample: tuple[tuple[int, int], ...] = ((8, 1), (8, 16), (16, 1), (16, 16))  # (grid, batch)
    # sampling sizes compiled as compile_mode=max-autotune (the batch-1 target row): ~1 min of
    # compiling a trace, too long for every row of a 10-minute bench; the others compile as default
    autotune: tuple[tuple[int, int], ...] = ((16, 1),)
    s1: stage1.Size = field(default_factory=stage1.Size)
    s1_batch: int = 16
    seconds: float = 16.0  # per interleaved row
    shards: str = "data/shapes/train-{00000..00007}.tar"
    text_model: str = "data/shapes/text.model"
    token_grid: int = 16  # demo_parti's image grid and codebook, for the token shards
    token_codebook: int = 1024
    tokens_per_shard: int = 500
    vqgan_overrides: list[str] = field(default_factory=list)
    parti_overrides: list[str] = field(default_factory=list)

    @classmethod
    def tiny(cls, shards: str, text_model: str, vqgan_overrides: list[str],
             parti_overrides: list[str]) -> Plan:
        return cls(s2=stage2.Size(dim=32, dec_layers=1, heads=2, codebook_size=64, text_len=8,
                                  vocab_size=64),
                   train=((2, 2), (4, 2)), compile=False, sample=((2, 1), (4, 2)),
                   s1=stage1.Size(image_size=32, patch_size=8, dim=32, layers=1, heads=2,
                                  codebook_size=64, code_dim=8),
                   s1_batch=2, seconds=0.3, shards=shards, text_model=text_model,
                   token_grid=4, token_codebook=64, tokens_per_shard=16, vqgan_overrides=vqgan_overrides,
                   parti_overrides=parti_overrides)


def _rates(times: dict[str, list[float]], ours: str, ref: str, per_call: float
           ) -> tuple[float, float, float]:
    """(ref rate, our rate, round-by-round ratio) for `per_call` units of work per call."""
    return (per_call / median(times[ref]), per_call / median(times[ours]),
            speedup(times, ours, ref))


def as_shipped(fns: dict[str, Callable[[], object]], ours_flush: bool
               ) -> dict[str, Callable[[], object]]:
    """Each contender under its own framework's float setting, set before every call: parti's
    trainer flushes denormal floats to zero on the CPU (`ours_flush`; its sampler does not); the
    peer keeps torch's default, no flush (given the flush, its 16x16 training step gained ~20% on
    ours: 1.63x -> 1.33x)."""
    def under(fn: Callable[[], object], flush: bool) -> Callable[[], object]:
        def call() -> object:
            torch.set_flush_denormal(flush)
            return fn()
        return call

    return {name: under(fn, ours_flush and name != "peer") for name, fn in fns.items()}


def as_the_peer(size: stage2.Size) -> stage2.Size:
    """Our model at `size` with the peer's layout: one key/value head per attention layer (the peer
    also shares it between keys and values) and no additive biases."""
    return replace(size, kv_heads=1, bias=False)


PEER_LAYOUT = ", 1 KV head, no biases (as the peer)"


def stage2_training(plan: Plan, matmul: float) -> list[Row]:
    """Per grid: ours eager, (plan.compile) ours under torch.compile and (plan.peer_layout) ours
    in the peer's layout, eager, each against the peer; our MFU against the matmul rate."""
    rows = []
    for grid, batch in plan.train:
        steps = stage2.train_steps(plan.s2, grid, batch)
        fns = {"ours": steps["ours"], "peer": steps["peer"]}
        if plan.compile:
            fns["compiled"] = stage2.our_train_step(plan.s2, grid, batch, compile=True)["ours"]
        if plan.peer_layout:
            fns["matched"] = stage2.our_train_step(as_the_peer(plan.s2), grid, batch)["ours"]
        t = interleaved(as_shipped(fns, ours_flush=True), plan.seconds)
        tokens = grid * grid * batch
        work = f"train {grid}x{grid} grid, batch {batch}"
        peer, ours, ratio = _rates(t, "ours", "peer", tokens)
        rows.append(Row("2", f"{work}, eager", "image tok/s", "peer", peer, ours, ratio, 1.5))
        extra = ""
        if plan.compile:
            rows.append(Row("2", f"{work}, torch.compile", "image tok/s", "peer",
                            *_rates(t, "compiled", "peer", tokens), 1.5))
            compiled = tokens / median(t["compiled"]) * steps["flops_per_token"]
            extra = f"torch.compile: {compiled / 1e9:.1f} GFLOP/s = {compiled / matmul:.0%}"
        if plan.peer_layout:
            rows.append(Row("2", f"{work}{PEER_LAYOUT}, eager", "image tok/s", "peer",
                            *_rates(t, "matched", "peer", tokens), 1.5))
        flops = ours * steps["flops_per_token"]
        rows.append(Row("2", f"{work}: ours eager MFU", "GFLOP/s", "fp32 matmul", matmul / 1e9,
                        flops / 1e9, flops / matmul, 0.6 if plan.s2.dim >= 256 else None, extra))
    return rows


def sampling(plan: Plan) -> list[Row]:
    """Whole images, guided: ours eager, (plan.compile) compiled and (plan.peer_layout) ours in the
    peer's layout (compiled if plan.compile), each timed just before and just after the peer's
    one run and warmed first (a compiled one compiles in its warm-up)."""
    rows = []
    # Each (grid, batch, model) is its own trace of the one compiled sampling step: past torch's
    # default limit of 8 a row would silently time the eager fallback.
    with torch._dynamo.config.patch(recompile_limit=64):
        for grid, batch in plan.sample:
            rows += _sampling_rows(plan, grid, batch)
    return rows


def _sampling_rows(plan: Plan, grid: int, batch: int) -> list[Row]:
    """The sampling rows of one (grid, batch)."""
    mode = None
    if plan.compile:
        mode = "max-autotune" if (grid, batch) in plan.autotune else "default"
    fns = stage2.samplers(plan.s2, grid, batch, mode)
    labels = {"ours": ", eager", "compiled": f", torch.compile {mode}"}
    if plan.peer_layout:
        fastest = "compiled" if plan.compile else "ours"
        fns["matched"] = stage2.our_samplers(as_the_peer(plan.s2), grid, batch, mode)[fastest]
        labels["matched"] = PEER_LAYOUT + labels[fastest]
    fns = as_shipped(fns, ours_flush=False)
    ours = [name for name in fns if name != "peer"]
    for name in ours:
        fns[name]()
    if grid * grid * batch < PEER_WARM_LIMIT:  # the longest peer runs (minutes) warm themselves
        fns["peer"]()
    before = {name: once(fns[name]) for name in ours}
    peer = once(fns["peer"])
    seconds = {name: (before[name] + once(fns[name])) / 2 for name in ours}
    n = grid * grid
    work = f"sample {n} tokens, guidance {stage2.GUIDANCE:g}, batch {batch}"
    return [Row("2", work + labels[name], "image tok/s", "peer", n * batch / peer, n * batch / t,
                peer / t, 30.0 if n >= 256 else None,
                f"img/s: peer {batch / peer:.3g}, ours {batch / t:.3g}")
            for name, t in seconds.items()]


def stage1_training(plan: Plan) -> list[Row]:
    s, b = plan.s1, plan.s1_batch
    steps = stage1.train_steps(s, b)
    full = stage1.full_loss_step(s, b)["ours"]
    t = interleaved(as_shipped({"ours": steps["ours"], "peer": steps["peer"], "full": full},
                               ours_flush=True), plan.seconds)
    work = (f"train {s.image_size} px, patch {s.patch_size}, width {s.dim}, "
            f"{s.layers}+{s.layers} layers, batch {b}")
    return [Row("1", f"{work}: recon + quantizer", "img/s", "peer", *_rates(t, "ours", "peer", b),
                1.5),
            Row("1", f"{work}: ours + LPIPS + GAN (D step too)", "img/s",
                "ours recon + quantizer", *_rates(t, "full", "ours", b))]


def whole_loop(plan: Plan, tmp: Path) -> list[Row]:
    tokens = loop.write_token_shards(plan.shards, tmp / "tokens", plan.token_grid,
                                     plan.token_codebook, plan.tokens_per_shard)
    demos = {"demo_vqgan": loop.vqgan(tmp / "vqgan", plan.shards, plan.vqgan_overrides),
             "demo_parti": loop.parti(tmp / "parti", tokens, plan.text_model,
                                      plan.parti_overrides)}
    rows = []
    for name, fns in demos.items():
        t = interleaved({k: fns[k] for k in ("loader", "memory", "bare")}, plan.seconds)
        rows.append(Row("loop", f"{name}: trainer step fed by the shard loader", "steps/s",
                        "in-memory batch", *_rates(t, "loader", "memory", 1), 0.95))
        rows.append(Row("loop", f"{name}: trainer step (task step + EMA)", "steps/s",
                        "bare model step", *_rates(t, "memory", "bare", 1), 0.95))
    return rows


def run(plan: Plan) -> tuple[list[Row], dict]:
    """Every row of the table, and what the run was measured on. Each section's rows and time go
    to stderr as soon as it ends, so a run cut short (a slow machine) still shows what it measured."""
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    matmul = measured_matmul_flops(torch.device("cpu"), seconds=1.0)
    print(f"[bench] fp32 matmul rate {matmul / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        sections = {"stage-2 training": lambda: stage2_training(plan, matmul),
                    "sampling": lambda: sampling(plan), "stage-1 training": lambda: stage1_training(plan),
                    "whole loop": lambda: whole_loop(plan, Path(tmp))}
        for name, measure in sections.items():
            began = time.perf_counter()
            new = measure()
            rows += new
            print(f"[bench] {name}: {time.perf_counter() - began:.0f} s\n{markdown(new)}",
                  file=sys.stderr, flush=True)
    info = {"matmul_gflops": matmul / 1e9, "seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": _cpu_name(), "load": (load_start, os.getloadavg()[0])}
    return rows, info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(rows: list[Row], info: dict) -> str:
    load = " -> ".join(f"{x:.2f}" for x in info["load"])
    return (f"{markdown(rows)}\n\nfp32 matmul rate measured in this run: "
            f"{info['matmul_gflops']:.1f} GFLOP/s ({info['cpu']}, {info['threads']} threads, "
            f"torch {info['torch']}); bench time {info['seconds']:.0f} s; 1-min load average "
            f"{load} (start -> end; above 0 means other jobs shared the cores).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, help="also write the table into this markdown file")
    args = parser.parse_args()
    rows, info = run(Plan())
    text = report(rows, info)
    print(text)
    if args.results:
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        args.results.write_text(f"# Benchmark results (`make bench`)\n\nLatest run: {date}.\n\n"
                                f"{text}\n{notes_of(args.results)}")


def notes_of(results: Path) -> str:
    """The hand-written sections of a results file (from its first `## ` heading on), which a
    new run keeps below its table; empty when the file does not exist yet."""
    if not results.is_file():
        return ""
    text = results.read_text()
    start = text.find("\n## ")
    return "" if start < 0 else text[start:]


if __name__ == "__main__":
    main()
