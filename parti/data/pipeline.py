"""The endless, resumable training stream over WebDataset shards.

The stream splits the shard list disjointly over ranks x DataLoader workers: global reader
g = rank * W + worker takes `shards[g::world_size * W]` (W = max(1, num_workers)).

Training stream of one reader: a sequence of blocks. Block b draws `shards_per_block` of the
reader's shards with replacement (numpy RNG seeded by (seed, rank, worker, b)), interleaves
their raw (undecoded) samples at random and passes them through a shuffle buffer that is drained
at the end of the block. The reader's position is (block, offset), offset = raw samples this block
has emitted, so resuming replays at most one block without decoding images. Decoding draws its
randomness from an RNG seeded by (seed, rank, worker, block, offset): identical after resume.

Batches are made inside the workers. Each carries its worker's logical id and state; the main
process (TrainLoader) records them, so `state_dict()` describes exactly the batches consumed.
A DataLoader serves workers round-robin; on resume physical worker i plays logical worker
(i + batches_consumed) % W so the round-robin continues where it stopped.

Bad input is skipped and counted by reason (`parti.data.shards`); a block that finds nothing
readable in any of the reader's shards raises a RuntimeError naming them.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from parti.data.shards import (
    WORKER,
    BadShard,
    Collate,
    Decode,
    SampleRng,
    SkipCounter,
    check_shards_exist,
    check_split,
    data_loader,
    decode_or_skip,
    default_collate_fn,
    expand_urls,
    guarded,
    has_sample,
    name_shards,
    physical_worker,
)

_STATE = "__state__"
_STATE_VERSION = 1


@dataclass
class _Split:
    """The shards of one training reader and how to name it."""

    urls: list[str]
    rank: int
    world_size: int
    readers_per_rank: int

    def shards(self, worker: int) -> list[str]:
        g = self.rank * self.readers_per_rank + worker
        return self.urls[g :: self.world_size * self.readers_per_rank]


def _block_stream(
    shards: list[str],
    rng: np.random.Generator,
    shards_per_block: int,
    shuffle_buffer: int,
    skip: int,
) -> Iterator[dict[str, Any] | BadShard]:
    """One block: resampled shards, randomly interleaved, shuffled; drops the first `skip`.

    Bad-shard markers pass straight through but only once `skip` samples are behind, so a
    replay does not count again what the interrupted run had already counted.
    """
    picks = rng.integers(len(shards), size=shards_per_block)
    readers = [guarded(shards[i]) for i in picks]
    buffer: list[dict[str, Any]] = []
    emitted = 0

    def pop_random() -> dict[str, Any]:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        return buffer.pop()

    while readers:
        i = int(rng.integers(len(readers)))
        item = next(readers[i], None)
        if item is None:
            readers.pop(i)
        elif isinstance(item, BadShard):
            if emitted >= skip:
                yield item
        else:
            buffer.append(item)
            if len(buffer) >= shuffle_buffer:
                sample = pop_random()
                if emitted >= skip:
                    yield sample
                emitted += 1
    while buffer:
        sample = pop_random()
        if emitted >= skip:
            yield sample
        emitted += 1


class DataStateMismatch(ValueError):
    """A saved data position whose loader settings differ from this loader's: it cannot be
    continued exactly (the caller may start the stream afresh instead)."""


def _fresh_worker_state() -> dict[str, Any]:
    return {"block": 0, "offset": 0, "skipped": {}, "consecutive": 0}


class _TrainStream(IterableDataset):
    """Endless batches of one rank; each DataLoader worker plays one logical reader."""

    def __init__(
        self,
        split: _Split,
        decode: Decode,
        collate: Collate,
        *,
        batch_size: int,
        seed: int,
        shards_per_block: int,
        shuffle_buffer: int,
        max_consecutive_skips: int,
    ):
        self.split = split
        self.decode = decode
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.shards_per_block = shards_per_block
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_skips = max_consecutive_skips
        self.worker_states = [_fresh_worker_state() for _ in range(split.readers_per_rank)]
        self.batches = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        readers = self.split.readers_per_rank
        worker = (physical_worker() + self.batches) % readers
        return self._batches(worker, copy.deepcopy(self.worker_states[worker]))

    def _batches(self, worker: int, state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        shards = self.split.shards(worker)
        ids = (self.seed, self.split.rank, worker)
        block, offset = state["block"], state["offset"]
        skips = SkipCounter(
            state["skipped"], state["consecutive"], self.max_consecutive_skips, shards
        )
        batch: list[dict[str, Any]] = []
        while True:
            block_rng = np.random.default_rng([*ids, block])
            stream = _block_stream(shards, block_rng, self.shards_per_block, self.shuffle_buffer,
                                   offset)
            for item in stream:
                rng = None
                if not isinstance(item, BadShard):  # offsets number the raw samples only
                    rng = SampleRng([*ids, block, offset])
                    offset += 1
                sample = decode_or_skip(item, self.decode, rng, skips)
                if sample is None:
                    continue
                batch.append(sample)
                if len(batch) == self.batch_size:
                    position = {
                        "block": block,
                        "offset": offset,
                        "skipped": dict(skips.counts),
                        "consecutive": skips.consecutive,
                    }
                    yield {**self.collate(batch), WORKER: worker, _STATE: position}
                    batch = []
            if offset == 0 and not any(has_sample(url) for url in shards):
                raise RuntimeError(
                    f"no valid samples in shards {name_shards(shards)} (rank {self.split.rank}, "
                    f"worker {worker}): every shard is unreadable or empty"
                )
            block, offset = block + 1, 0


class TrainLoader:
    """Endless training batches of one rank, with a cheap, exact, saveable position."""

    def __init__(self, stream: _TrainStream, num_workers: int, pin_memory: bool):
        self._stream = stream
        self._num_workers = num_workers
        self._pin_memory = pin_memory
        self._iterations = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on; a new iter() continues where the last stopped."""
        self._iterations += 1
        iteration = self._iterations
        loader = data_loader(self._stream, self._num_workers, self._pin_memory)
        readers = self._stream.split.readers_per_rank
        for batch in loader:
            if iteration != self._iterations:
                raise RuntimeError("a newer iterator of this TrainLoader owns the stream position")
            worker = batch.pop(WORKER)
            if worker != self._stream.batches % readers:
                raise RuntimeError(
                    f"batch from data worker {worker}, expected {self._stream.batches % readers}: "
                    "the DataLoader no longer serves workers round-robin, resume would not be exact"
                )
            self._stream.worker_states[worker] = batch.pop(_STATE)
            self._stream.batches += 1
            yield batch

    def _fingerprint(self) -> dict[str, int]:
        """Settings a saved position only makes sense with."""
        s = self._stream
        return {
            "seed": s.seed,
            "rank": s.split.rank,
            "world_size": s.split.world_size,
            "readers_per_rank": s.split.readers_per_rank,
            "num_shards": len(s.split.urls),
            "shards_per_block": s.shards_per_block,
            "shuffle_buffer": s.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-python position: batches consumed and each worker's (block, offset, skips)."""
        return {
            "version": _STATE_VERSION,
            **self._fingerprint(),
            "batches": self._stream.batches,
            "workers": copy.deepcopy(self._stream.worker_states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict()` with the same settings."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown data state version {state.get('version')!r}")
        expected = self._fingerprint()
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {old} now {new}" for k, (old, new) in changed.items())
            raise DataStateMismatch(f"the saved data position was taken with other loader "
                                    f"settings ({detail})")
        self._stream.batches = int(state["batches"])
        self._stream.worker_states = copy.deepcopy(state["workers"])

    @property
    def skipped(self) -> dict[str, int]:
        """Cumulative skip counts by reason on this rank (sum over workers)."""
        total: Counter[str] = Counter()
        for worker_state in self._stream.worker_states:
            total.update(worker_state["skipped"])
        return dict(total)


def build_train_loader(
    urls: str | Sequence[str],
    decode: Decode,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shards_per_block: int = 4,
    shuffle_buffer: int = 1000,
    max_consecutive_skips: int = 1000,
    collate: Collate = default_collate_fn,
    pin_memory: bool = False,
    state: dict[str, Any] | None = None,
) -> TrainLoader:
    """Endless, resampled, shuffled training batches of this rank; `state` resumes exactly."""
    check_split(rank, world_size, num_workers, batch_size)
    if seed < 0 or shards_per_block < 1 or shuffle_buffer < 1 or max_consecutive_skips < 1:
        raise ValueError(
            "need seed >= 0, shards_per_block >= 1, shuffle_buffer >= 1 and "
            f"max_consecutive_skips >= 1, got {seed}, {shards_per_block}, {shuffle_buffer}, "
            f"{max_consecutive_skips}"
        )
    shards = expand_urls(urls)
    check_shards_exist(shards)
    workers = max(1, num_workers)
    readers = world_size * workers
    if len(shards) < readers:
        raise ValueError(
            f"{len(shards)} shards < {world_size} ranks x {workers} workers = {readers} readers; "
            "write more shards or use fewer workers"
        )
    stream = _TrainStream(
        _Split(shards, rank, world_size, workers),
        decode,
        collate,
        batch_size=batch_size,
        seed=seed,
        shards_per_block=shards_per_block,
        shuffle_buffer=shuffle_buffer,
        max_consecutive_skips=max_consecutive_skips,
    )
    loader = TrainLoader(stream, num_workers, pin_memory)
    if state is not None:
        loader.load_state_dict(state)
    return loader
