"""Reading WebDataset tar shards and skipping what cannot be used, shared by the training stream
(`parti.data.pipeline`) and the evaluation stream (`parti.data.eval_loader`).

Shards are img2dataset-style tars (`KEY.jpg` + `KEY.txt` + optional `KEY.json`, or token shards
`KEY.tokens.npy` + `KEY.txt`). Bad input is skipped and counted by reason ("corrupt_image",
"missing_caption", "missing_image", "bad_shard", "empty_shard", ...); `max_consecutive_skips`
skips in a row raise a RuntimeError naming the shards.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

Rng: TypeAlias = "np.random.Generator | SampleRng"  # a decoder's per-sample random source
Decode = Callable[[dict[str, Any], Rng], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]

WORKER = "__worker__"  # batch key: the logical reader that made the batch
SKIPPED = "__skipped__"  # batch key: that reader's skip counts so far
MAX_NAMED_SHARDS = 8


class SkipSample(Exception):
    """Raised by a decode fn to skip a sample; args[0] is the reason key (e.g. "corrupt_image")."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else "unknown"


class ShardError(Exception):
    """A tar shard that cannot be opened or read to the end (truncated, corrupt, failed pipe)."""


@dataclass(frozen=True)
class BadShard:
    """Marker emitted in place of the rest of a shard that failed to read, or of an empty one."""

    url: str
    reason: str = "bad_shard"  # or "empty_shard": a readable tar without a single sample


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
            f"{len(missing)} of {len(urls)} shards do not exist: {name_shards(missing)}; "
            "check the shard pattern, or write them (image shards: python -m parti.data.write; "
            "stage-2 token shards: python -m parti.data.tokenize --shards ... --tokenizer "
            "<stage-1 export> --out ...; the whole shapes demo: make demo)"
        )


def name_shards(urls: Sequence[str]) -> str:
    """Shard list for messages, shortened when long."""
    shown = ", ".join(urls[:MAX_NAMED_SHARDS])
    more = len(urls) - MAX_NAMED_SHARDS
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


def guarded(url: str) -> Iterator[dict[str, Any] | BadShard]:
    """Raw samples of a shard, ending with a BadShard marker if the shard fails to read or
    holds no sample at all."""
    empty = True
    try:
        for sample in read_shard(url):
            empty = False
            yield sample
    except ShardError:
        yield BadShard(url)
        return
    if empty:
        yield BadShard(url, "empty_shard")


def has_sample(url: str) -> bool:
    """Whether a shard yields at least one raw sample before any read error."""
    return any(not isinstance(item, BadShard) for item in guarded(url))


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


class SkipCounter:
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
                f"no valid samples in shards {name_shards(self.shards)}: {self.consecutive} "
                f"samples skipped in a row (total by reason: {dict(self.counts)})"
            )

    def ok(self) -> None:
        self.consecutive = 0


class SampleRng:
    """A sample's random generator, seeded by its place in the stream and made on first use:
    seeding costs ~14 us a sample, which decoders that draw nothing (token samples) never pay.
    It answers every np.random.Generator method (it is not one: isinstance checks fail)."""

    def __init__(self, seed: Sequence[int]):
        self._seed = list(seed)
        self._rng: np.random.Generator | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (copy, pickle): no generator behind it either
            raise AttributeError(name)
        if self._rng is None:
            self._rng = np.random.default_rng(self._seed)
        return getattr(self._rng, name)


def decode_or_skip(item: dict[str, Any] | BadShard, decode: Decode, rng: Rng | None,
                   skips: SkipCounter) -> dict[str, Any] | None:
    """The decoded sample, or None once the reason `item` cannot be used is counted."""
    if isinstance(item, BadShard):
        skips.skip(item.reason)
        return None
    try:
        sample = decode(item, rng)
    except SkipSample as exn:
        skips.skip(exn.reason)
        return None
    skips.ok()
    return sample


def physical_worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def data_loader(stream: IterableDataset, num_workers: int, pin_memory: bool) -> DataLoader:
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


def check_split(rank: int, world_size: int, num_workers: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def iter_raw_samples(
    urls: str | Sequence[str], exts: Collection[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples of all shards in order (single process); bad shards raise ShardError."""
    shards = expand_urls(urls)
    check_shards_exist(shards)
    for url in shards:
        yield from read_shard(url, exts)
