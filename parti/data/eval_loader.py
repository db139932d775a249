"""The finite evaluation stream over WebDataset shards, split by sample across ranks x workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from parti.data.shards import (
    SKIPPED,
    WORKER,
    BadShard,
    Collate,
    Decode,
    SkipCounter,
    check_shards_exist,
    check_split,
    data_loader,
    decode_or_skip,
    default_collate_fn,
    expand_urls,
    guarded,
    physical_worker,
)


class _EvalStream(IterableDataset):
    """One reader's share of the eval samples; ends with a payload-free skip-count marker.

    Every reader walks all shards in order and numbers their raw samples (a bad-shard marker
    takes a number too); reader g of R keeps the numbers i with i % R == g and i < max_samples.
    The union over readers is the first `max_samples` samples whatever the world size, so 1, 2
    or 8 ranks evaluate the same images, and each skip is counted by exactly one reader.
    """

    def __init__(
        self,
        urls: list[str],
        reader: int,
        readers: int,
        decode: Decode,
        collate: Collate,
        batch_size: int,
        max_samples: int | None,
        max_consecutive_skips: int,
    ):
        self.urls = urls
        self.reader = reader
        self.readers = readers
        self.decode = decode
        self.collate = collate
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.max_consecutive_skips = max_consecutive_skips

    def _raw_share(self, reader: int) -> Iterator[dict[str, Any] | BadShard]:
        index = 0
        for url in self.urls:
            for item in guarded(url):
                if self.max_samples is not None and index >= self.max_samples:
                    return
                if index % self.readers == reader:
                    yield item
                index += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = physical_worker()
        reader = self.reader + worker
        skips = SkipCounter({}, 0, self.max_consecutive_skips, self.urls)
        rng = np.random.default_rng([reader])
        batch: list[dict[str, Any]] = []
        for item in self._raw_share(reader):
            sample = decode_or_skip(item, self.decode, rng, skips)
            if sample is None:
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield {**self.collate(batch), WORKER: worker, SKIPPED: dict(skips.counts)}
                batch = []
        if batch:
            yield {**self.collate(batch), WORKER: worker, SKIPPED: dict(skips.counts)}
        yield {WORKER: worker, SKIPPED: dict(skips.counts)}


class EvalLoader:
    """Finite evaluation batches of one rank: every sample read once across ranks x workers."""

    def __init__(self, stream: _EvalStream, num_workers: int, pin_memory: bool):
        self._stream = stream
        self._num_workers = num_workers
        self._pin_memory = pin_memory
        self._skipped: dict[int, dict[str, int]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._skipped = {}
        loader = data_loader(self._stream, self._num_workers, self._pin_memory)
        for batch in loader:
            worker = batch.pop(WORKER)
            self._skipped[worker] = batch.pop(SKIPPED)
            if batch:
                yield batch

    @property
    def skipped(self) -> dict[str, int]:
        """Skip counts by reason of the latest pass on this rank (sum over workers)."""
        total: Counter[str] = Counter()
        for counts in self._skipped.values():
            total.update(counts)
        return dict(total)


def build_eval_loader(
    urls: str | Sequence[str],
    decode: Decode,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    max_samples: int | None = None,
    max_consecutive_skips: int = 1000,
    collate: Collate = default_collate_fn,
    pin_memory: bool = False,
) -> EvalLoader:
    """Finite, deterministic batches (last may be partial) of this rank's share of the first
    `max_samples` samples (None: all), split by sample so every world size sees the same set."""
    check_split(rank, world_size, num_workers, batch_size)
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 or None, got {max_samples}")
    shards = expand_urls(urls)
    check_shards_exist(shards)
    per_rank = max(1, num_workers)
    stream = _EvalStream(shards, rank * per_rank, world_size * per_rank, decode, collate,
                         batch_size, max_samples, max_consecutive_skips)
    return EvalLoader(stream, num_workers, pin_memory)
