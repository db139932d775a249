"""Write img2dataset-style WebDataset shards (KEY.jpg|png|... + KEY.txt + KEY.json).

    python -m parti.data.write --from-folder photos/ --out data/photos      # sidecar .txt captions
    python -m parti.data.write --from-list pairs.csv --out data/pairs       # or .tsv / .jsonl
    python -m parti.data.write --from-list pairs.jsonl --image-col path --caption-col text --out ...
    python -m parti.data.write --from-shapes 10000 --seed 0 --size 64 --out data/shapes

Shard i holds the usable items among input items [i * per_shard, (i + 1) * per_shard), so a rerun
on the same input keeps the complete shards without reading their items and writes only the
missing ones. Each shard is written to `NAME.tmp` and renamed when complete. Image files are
copied byte for byte with their extension; shapes images are written as png.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from webdataset import TarWriter

from parti.data.transforms import IMAGE_EXTS


@dataclass(frozen=True)
class Skipped:
    """Stands in for an input item that cannot be written, keeping later items in their shard."""

    reason: str


Item = dict[str, Any] | Skipped
# samples_from(start) yields the input items from index `start` to the end.
SampleSource = Callable[[int], Iterable[Item]]


@dataclass
class WriteSummary:
    """What one writer run did."""

    out: str
    shards_written: int = 0
    shards_kept: int = 0
    samples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.out}: wrote {self.shards_written} shards ({self.shards_kept} complete ones "
            f"kept), {self.samples} samples, skipped: {reasons}, {self.seconds:.1f} s"
        )


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in metadata -> plain python."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_sample(sample: dict[str, Any]) -> dict[str, bytes | str]:
    """Sample dict -> tar members: bytes as they are, str as utf-8, arrays as .npy, dicts as json."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in os.path.basename(key):
        raise ValueError(f"sample key must be a non-empty string without dots, got {key!r}")
    encoded: dict[str, bytes | str] = {"__key__": key}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        if isinstance(value, bytes | bytearray | memoryview):
            encoded[ext] = bytes(value)
        elif isinstance(value, str):
            encoded[ext] = value.encode("utf-8")
        elif isinstance(value, np.ndarray) and ext.endswith("npy"):
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            encoded[ext] = buffer.getvalue()
        elif isinstance(value, dict | list) and ext.endswith("json"):
            encoded[ext] = json.dumps(value, default=_json_default).encode("utf-8")
        else:
            raise TypeError(f"sample {key}: cannot write {type(value).__name__} as .{ext}")
    return encoded


def write_tar(path: str | Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples to one tar, atomically (PATH.tmp renamed when complete); returns the count."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as file:
            # mtime fixed so that the same samples always give the same bytes.
            with TarWriter(file, encoder=False, mtime=0) as writer:
                for sample in samples:
                    writer.write(encode_sample(sample))
                    count += 1
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


def shard_path(out: str | Path, prefix: str, index: int) -> Path:
    """OUT/PREFIX-00042.tar"""
    return Path(out) / f"{prefix}-{index:05d}.tar"


def _drop_skipped(items: Iterable[Item], skipped: Counter[str]) -> Iterator[dict[str, Any]]:
    """The sample dicts among items; Skipped ones are counted by reason."""
    for item in items:
        if isinstance(item, Skipped):
            skipped[item.reason] += 1
        else:
            yield item


def write_shards(
    samples_from: SampleSource, out: str | Path, per_shard: int = 1000, prefix: str = "shard"
) -> WriteSummary:
    """Write `{prefix}-{i:05d}.tar` shards of `per_shard` input items; existing shards are kept.

    `samples_from(start)` yields the items (sample dicts {"__key__": str, ext: bytes|str|...} or
    Skipped) from input index `start` on; it is called once per run of missing shards.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    if not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty file name part, got {prefix!r}")
    started = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    summary = WriteSummary(out=str(out))
    items: Iterator[Item] | None = None
    index = 0
    while True:
        path = shard_path(out, prefix, index)
        if path.exists():
            summary.shards_kept += 1
            items = None
            index += 1
            continue
        if items is None:
            items = iter(samples_from(index * per_shard))
        first = next(items, None)
        if first is None:
            break
        chunk = itertools.chain([first], itertools.islice(items, per_shard - 1))
        summary.samples += write_tar(path, _drop_skipped(chunk, summary.skipped))
        summary.shards_written += 1
        index += 1
    summary.seconds = time.perf_counter() - started
    return summary


def _caption(text: Any) -> str | Skipped:
    """The stripped caption; a blank or absent one is missing, as training would skip it."""
    if not isinstance(text, str) or not text.strip():
        return Skipped("missing_caption")
    return text.strip()


def _read_caption(path: Path) -> str | Skipped:
    try:
        return _caption(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Skipped("missing_caption")
    except (OSError, UnicodeDecodeError):
        return Skipped("unreadable_caption")


def _file_sample(index: int, image: Path, caption: str | Skipped, meta: dict[str, Any]) -> Item:
    """A sample with the image file's original bytes under its (lower-case) extension."""
    if isinstance(caption, Skipped):
        return caption
    ext = image.suffix[1:].lower()
    if ext not in IMAGE_EXTS:
        return Skipped("unsupported_image_format")
    try:
        data = image.read_bytes()
    except FileNotFoundError:
        return Skipped("missing_image")
    except OSError:
        return Skipped("unreadable_image")
    return {"__key__": f"{index:09d}", ext: data, "txt": caption, "json": meta}


def folder_source(root: str | Path) -> SampleSource:
    """Images under `root` (recursive, sorted) with sidecar captions (`photo.jpg` + `photo.txt`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    images = sorted(
        (p for p in root.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )

    def samples_from(start: int) -> Iterator[Item]:
        for index in range(start, len(images)):
            image = images[index]
            meta = {"source": image.relative_to(root).as_posix()}
            yield _file_sample(index, image, _read_caption(image.with_suffix(".txt")), meta)

    return samples_from


def _list_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV/TSV (with header) or JSONL file as dicts."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as file:
            yield from csv.DictReader(file, delimiter="," if suffix == ".csv" else "\t")
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exn:
                    raise ValueError(f"{path}:{line_number}: invalid JSON ({exn})") from exn
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{line_number}: expected a JSON object per line")
                yield row
    else:
        raise ValueError(f"{path}: unknown list format {suffix!r}; use .csv, .tsv or .jsonl")


def list_source(
    path: str | Path, image_col: str = "image", caption_col: str = "caption"
) -> SampleSource:
    """(image path, caption) rows of a CSV/TSV/JSONL file; relative paths from the file's folder.

    Other columns go to the sample's json.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    first = next(_list_rows(path), None)
    if first is None:
        raise ValueError(f"{path} has no rows")
    missing = [col for col in (image_col, caption_col) if col not in first]
    if missing:
        raise ValueError(
            f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(first)}); "
            "choose them with --image-col / --caption-col"
        )

    def samples_from(start: int) -> Iterator[Item]:
        for index, row in itertools.islice(enumerate(_list_rows(path)), start, None):
            image, caption = row.get(image_col), _caption(row.get(caption_col))
            if not isinstance(image, str) or not image:
                yield Skipped("missing_image")
            else:
                extra = {k: v for k, v in row.items() if k not in (image_col, caption_col)}
                meta = {"source": image, **extra}
                yield _file_sample(index, path.parent / image, caption, meta)

    return samples_from


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_source(n: int, seed: int, size: int = 64) -> SampleSource:
    """The first `n` samples of the procedural shapes data set, images as png."""

    def samples_from(start: int) -> Iterator[Item]:
        from parti.data.shapes import generate

        for key, image, caption, meta in generate(max(0, n - start), seed, size=size, start=start):
            yield {"__key__": key, "png": _png_bytes(image), "txt": caption, "json": meta}

    return samples_from


def main(argv: list[str] | None = None) -> WriteSummary:
    parser = argparse.ArgumentParser(
        prog="python -m parti.data.write",
        description="Write img2dataset-style WebDataset shards from images and captions.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", type=Path, metavar="DIR", help="images + sidecar .txt")
    source.add_argument("--from-list", type=Path, metavar="FILE", help=".csv/.tsv/.jsonl list")
    source.add_argument("--from-shapes", type=int, metavar="N", help="N shapes samples")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--per-shard", type=int, default=1000, help="input items per shard")
    parser.add_argument("--prefix", default="shard", help="shard names: PREFIX-00000.tar")
    parser.add_argument("--image-col", default="image", help="list column of image paths")
    parser.add_argument("--caption-col", default="caption", help="list column of captions")
    parser.add_argument("--seed", type=int, default=0, help="shapes seed")
    parser.add_argument("--size", type=int, default=64, help="shapes image size")
    args = parser.parse_args(argv)
    try:
        if args.from_folder is not None:
            samples_from = folder_source(args.from_folder)
        elif args.from_list is not None:
            samples_from = list_source(args.from_list, args.image_col, args.caption_col)
        else:
            if args.from_shapes < 0 or args.size < 1:
                raise ValueError("--from-shapes must be >= 0 and --size >= 1")
            samples_from = shapes_source(args.from_shapes, args.seed, args.size)
        summary = write_shards(samples_from, args.out, args.per_shard, args.prefix)
    except (FileNotFoundError, ValueError) as exn:
        parser.error(str(exn))
    print(summary.line())
    return summary


if __name__ == "__main__":
    main()
