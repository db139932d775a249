"""Interleaved timing: the contenders of one row run in alternating rounds, so that machine load
(another job on the same cores) hits all of them, and ratios are taken within each round."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def warm(fn: Callable[[], object], seconds: float, calls: int = 2) -> None:
    """Run fn for at least `calls` calls and `seconds`: the peer's training step was seen to run up
    to 2x slower for its first ~10 calls (allocations and caches settling)."""
    start, done = time.perf_counter(), 0
    while done < calls or time.perf_counter() - start < seconds:
        fn()
        done += 1


def interleaved(fns: dict[str, Callable[[], object]], seconds: float, rounds: int = 6
                ) -> dict[str, list[float]]:
    """Seconds per call of each fn in each round; every round gives each fn ~seconds / rounds,
    after a warm-up of ~seconds / 4 each."""
    for fn in fns.values():
        warm(fn, seconds / 4)
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    budget = seconds / (rounds * len(fns))
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < budget:
                fn()
                calls += 1
            per_call[name].append((time.perf_counter() - start) / calls)
    return per_call


def median(times: list[float]) -> float:
    return statistics.median(times)


def speedup(times: dict[str, list[float]], ours: str, ref: str) -> float:
    """Median over rounds of ref time / ours time: how many times faster `ours` ran."""
    return statistics.median(r / o for r, o in zip(times[ref], times[ours]))


def once(fn: Callable[[], object]) -> float:
    """Seconds of a single call (for work that is long already, e.g. a whole peer sampling run)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
