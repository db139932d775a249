"""WebDataset shard streams: an endless, resumable training stream and a finite evaluation stream.

Shards are img2dataset-style tars (`KEY.jpg` + `KEY.txt` + optional `KEY.json`, or token shards
`KEY.tokens.npy` + `KEY.txt`). Both streams split the shard list disjointly over
ranks x DataLoader workers: global reader g = rank * W + worker takes `shards[g::world_size * W]`
(W = max(1, num_workers)).

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

Bad input is skipped and counted by reason ("corrupt_image", "missing_caption", "missing_image",
"bad_shard", ...); `max_consecutive_skips` skips in a row, or a block that finds nothing readable
in any of the reader's shards, raise a RuntimeError naming the shards.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

Decode = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]

_WORKER = "__worker__"
_STATE = "__state__"
_SKIPPED = "__skipped__"
_STATE_VERSION = 1
_MAX_NAMED_SHARDS = 8


class SkipSample(Exception):
    """Raised by a decode fn to skip a sample; args[0] is the reason key (e.g. "corrupt_image")."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else "unknown"


class ShardError(Exception):
    """A tar shard that cannot be opened or read to the end (truncated, corrupt, failed pipe)."""


@dataclass(frozen=True)
class _BadShard:
    """Marker emitted in place of the rest of a shard that failed to read."""

    url: str


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard list from brace patterns, `::`-separated patterns, lists of them, paths, `pipe:` urls."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"shard urls must be strings, got {pattern!r} in {urls!r}")
    expanded = [
        url.strip()
        for pattern in patterns
        for part in pattern.split("::")
        for url in braceexpand.braceexpand(part.strip())
        if url.strip()
    ]
    if not expanded:
        raise ValueError(f"no shards in {urls!r}: give a path, a brace pattern or a list of them")
    return expanded


def check_shards_exist(urls: list[str]) -> None:
    """Fail fast on local shard paths that do not exist (most often a wrong pattern)."""
    local = [url for url in urls if urlparse(url).scheme in ("", "file")]
    missing = [url for url in local if not os.path.exists(url.removeprefix("file://"))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards do not exist: {_name_shards(missing)}; "
            "check the shard pattern, or write them (image shards: python -m parti.data.write; "
            "stage-2 token shards: python -m parti.data.tokenize --shards ... --tokenizer "
            "<stage-1 export> --out ...; the whole shapes demo: make demo)"
        )


def _name_shards(urls: Sequence[str]) -> str:
    """Shard list for messages, shortened when long."""
    shown = ", ".join(urls[:_MAX_NAMED_SHARDS])
    more = len(urls) - _MAX_NAMED_SHARDS
    return shown + (f" ... (+{more} more)" if more > 0 else "")


def read_shard(url: str, exts: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard: {"__key__", "__url__", ext: bytes}; raises ShardError.

    `exts` keeps only those extensions (e.g. {"txt"}), skipping the bytes of the others.
    """
    select = None if exts is None else (lambda name: _ext(name) in exts)
    try:
        stream = gopen(url, "rb")
    except Exception as exn:
        raise ShardError(f"cannot open shard {url}: {exn}") from exn
    complete = False
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], select_files=select)
        yield from group_by_keys(files)
        complete = True
    except Exception as exn:
        raise ShardError(f"cannot read shard {url}: {exn}") from exn
    finally:
        try:
            stream.close()
        except Exception as exn:
            # A pipe command's failing exit status surfaces here; when the consumer stopped
            # early (complete is False) it is only the broken pipe and is ignored.
            if complete:
                raise ShardError(f"shard command failed for {url}: {exn}") from exn


def _ext(name: str) -> str:
    """Extension as WebDataset groups it: everything after the first dot of the base name."""
    return os.path.basename(name).split(".", 1)[-1].lower()


def _guarded(url: str) -> Iterator[dict[str, Any] | _BadShard]:
    """Raw samples of a shard, ending with a _BadShard marker if the shard fails to read."""
    try:
        yield from read_shard(url)
    except ShardError:
        yield _BadShard(url)


def _has_sample(url: str) -> bool:
    """Whether a shard yields at least one raw sample before any read error."""
    return any(not isinstance(item, _BadShard) for item in _guarded(url))


def default_collate_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, make tensors of numbers, keep lists of anything else (strings, dicts)."""
    keys = list(samples[0])
    for sample in samples:
        if set(sample) != set(keys):
            raise ValueError(f"samples have different keys: {sorted(keys)} vs {sorted(sample)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], torch.Tensor):
            try:
                batch[key] = torch.stack(values)
            except RuntimeError as exn:
                shapes = sorted({tuple(value.shape) for value in values})
                raise ValueError(f"cannot batch '{key}': shapes differ {shapes}") from exn
        elif isinstance(values[0], int | float) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class _SkipCounter:
    """Skip counts by reason plus the run of consecutive skips that stops a hopeless stream."""

    def __init__(self, counts: dict[str, int], consecutive: int, limit: int, shards: list[str]):
        self.counts = Counter(counts)
        self.consecutive = consecutive
        self.limit = limit
        self.shards = shards

    def skip(self, reason: str) -> None:
        self.counts[reason] += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise RuntimeError(
                f"no valid samples in shards {_name_shards(self.shards)}: {self.consecutive} "
                f"samples skipped in a row (total by reason: {dict(self.counts)})"
            )

    def ok(self) -> None:
        self.consecutive = 0


@dataclass
class _Split:
    """The shards of one reader and how to name it: shared by the train and eval streams."""

    urls: list[str]
    rank: int
    world_size: int
    readers_per_rank: int

    def shards(self, worker: int) -> list[str]:
        g = self.rank * self.readers_per_rank + worker
        return self.urls[g :: self.world_size * self.readers_per_rank]


def _physical_worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _block_stream(
    shards: list[str],
    rng: np.random.Generator,
    shards_per_block: int,
    shuffle_buffer: int,
    skip: int,
) -> Iterator[dict[str, Any] | _BadShard]:
    """One block: resampled shards, randomly interleaved, shuffled; drops the first `skip`.

    Bad-shard markers pass straight through but only once `skip` samples are behind, so a
    replay does not count again what the interrupted run had already counted.
    """
    picks = rng.integers(len(shards), size=shards_per_block)
    readers = [_guarded(shards[i]) for i in picks]
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
        elif isinstance(item, _BadShard):
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


def _fresh_worker_state() -> dict[str, Any]:
    return {"block": 0, "offset": 0, "skipped": {}, "consecutive": 0}


def _data_loader(stream: IterableDataset, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over a stream that batches inside its workers."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # A private generator: seeding workers must not draw from the global torch RNG, whose
        # state a resumed run restores exactly.
        generator=torch.Generator(),
    )


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
        worker = (_physical_worker() + self.batches) % readers
        return self._batches(worker, copy.deepcopy(self.worker_states[worker]))

    def _batches(self, worker: int, state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        shards = self.split.shards(worker)
        ids = (self.seed, self.split.rank, worker)
        block, offset = state["block"], state["offset"]
        skips = _SkipCounter(
            state["skipped"], state["consecutive"], self.max_consecutive_skips, shards
        )
        batch: list[dict[str, Any]] = []
        while True:
            rng = np.random.default_rng([*ids, block])
            stream = _block_stream(shards, rng, self.shards_per_block, self.shuffle_buffer, offset)
            for item in stream:
                if isinstance(item, _BadShard):
                    skips.skip("bad_shard")
                    continue
                sample_rng = np.random.default_rng([*ids, block, offset])
                offset += 1
                try:
                    sample = self.decode(item, sample_rng)
                except SkipSample as exn:
                    skips.skip(exn.reason)
                    continue
                skips.ok()
                batch.append(sample)
                if len(batch) == self.batch_size:
                    position = {
                        "block": block,
                        "offset": offset,
                        "skipped": dict(skips.counts),
                        "consecutive": skips.consecutive,
                    }
                    yield {**self.collate(batch), _WORKER: worker, _STATE: position}
                    batch = []
            if offset == 0 and not any(_has_sample(url) for url in shards):
                raise RuntimeError(
                    f"no valid samples in shards {_name_shards(shards)} (rank {self.split.rank}, "
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
        loader = _data_loader(self._stream, self._num_workers, self._pin_memory)
        readers = self._stream.split.readers_per_rank
        for batch in loader:
            if iteration != self._iterations:
                raise RuntimeError("a newer iterator of this TrainLoader owns the stream position")
            worker = batch.pop(_WORKER)
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
            raise ValueError(
                f"data state does not match this loader ({detail}); exact resume needs the same "
                "settings, or start the data stream fresh without the state"
            )
        self._stream.batches = int(state["batches"])
        self._stream.worker_states = copy.deepcopy(state["workers"])

    @property
    def skipped(self) -> dict[str, int]:
        """Cumulative skip counts by reason on this rank (sum over workers)."""
        total: Counter[str] = Counter()
        for worker_state in self._stream.worker_states:
            total.update(worker_state["skipped"])
        return dict(total)


def _check_split(rank: int, world_size: int, num_workers: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


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
    _check_split(rank, world_size, num_workers, batch_size)
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


class _EvalStream(IterableDataset):
    """Each of this reader's shards once, in order; ends with a payload-free skip-count marker."""

    def __init__(
        self,
        split: _Split,
        decode: Decode,
        collate: Collate,
        batch_size: int,
        max_consecutive_skips: int,
    ):
        self.split = split
        self.decode = decode
        self.collate = collate
        self.batch_size = batch_size
        self.max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = _physical_worker()
        shards = self.split.shards(worker)
        skips = _SkipCounter({}, 0, self.max_consecutive_skips, shards)
        rng = np.random.default_rng([self.split.rank, worker])
        batch: list[dict[str, Any]] = []
        for url in shards:
            for item in _guarded(url):
                if isinstance(item, _BadShard):
                    skips.skip("bad_shard")
                    continue
                try:
                    sample = self.decode(item, rng)
                except SkipSample as exn:
                    skips.skip(exn.reason)
                    continue
                skips.ok()
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield {**self.collate(batch), _WORKER: worker, _SKIPPED: dict(skips.counts)}
                    batch = []
        if batch:
            yield {**self.collate(batch), _WORKER: worker, _SKIPPED: dict(skips.counts)}
        yield {_WORKER: worker, _SKIPPED: dict(skips.counts)}


class EvalLoader:
    """Finite evaluation batches of one rank: every shard read once across ranks x workers."""

    def __init__(self, stream: _EvalStream, num_workers: int, pin_memory: bool):
        self._stream = stream
        self._num_workers = num_workers
        self._pin_memory = pin_memory
        self._skipped: dict[int, dict[str, int]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._skipped = {}
        loader = _data_loader(self._stream, self._num_workers, self._pin_memory)
        for batch in loader:
            worker = batch.pop(_WORKER)
            self._skipped[worker] = batch.pop(_SKIPPED)
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
    max_consecutive_skips: int = 1000,
    collate: Collate = default_collate_fn,
    pin_memory: bool = False,
) -> EvalLoader:
    """Finite, deterministic batches (last may be partial); a reader without shards yields none."""
    _check_split(rank, world_size, num_workers, batch_size)
    shards = expand_urls(urls)
    check_shards_exist(shards)
    split = _Split(shards, rank, world_size, max(1, num_workers))
    stream = _EvalStream(split, decode, collate, batch_size, max_consecutive_skips)
    return EvalLoader(stream, num_workers, pin_memory)


def iter_raw_samples(
    urls: str | Sequence[str], exts: Collection[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples of all shards in order (single process); bad shards raise ShardError."""
    shards = expand_urls(urls)
    check_shards_exist(shards)
    for url in shards:
        yield from read_shard(url, exts)
