"""The built-in shapes data set: train and held-out shards plus the caption tokenizer, written once.

    python -m parti.data.shapes_dataset --out data/shapes      # what `make demo` runs

The recipe (sizes, seeds, vocabulary) lives here only, so `make demo` and the first run of
`train_vqgan.py` / `train_parti.py` with `data.generate=true` (conf/data/shapes.yaml) write the
same files. Every file is written under a temporary name and renamed, the tokenizer last, so a
killed run leaves complete files only and the next one writes what is missing. A lock file in
the folder makes one process the writer when several start together.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parti import distributed
from parti.data.shards import expand_urls
from parti.data.write import shapes_source, shard_path, write_shards
from parti.distributed import Dist
from parti.text.train import iter_captions, train_tokenizer

if TYPE_CHECKING:
    from parti.config import DataConfig

TEXT_MODEL = "text.model"


@dataclass(frozen=True)
class ShapesRecipe:
    """How many images, their size and seeds, the shard size and the caption vocabulary."""

    train_images: int = 20000
    eval_images: int = 512
    per_shard: int = 2500
    size: int = 64
    train_seed: int = 0
    eval_seed: int = 1
    # BPE: on this tiny caption grammar SentencePiece's unigram model is capped at ~50 pieces.
    vocab_size: int = 512

    def shards(self, out: str | Path, prefix: str) -> list[Path]:
        images = self.train_images if prefix == "train" else self.eval_images
        return [shard_path(out, prefix, i) for i in range(math.ceil(images / self.per_shard))]

    def files(self, out: str | Path) -> list[Path]:
        """Every file the recipe writes into `out`, in writing order (the tokenizer last)."""
        return [*self.shards(out, "train"), *self.shards(out, "eval"), Path(out) / TEXT_MODEL]


def write_shapes(out: str | Path, recipe: ShapesRecipe = ShapesRecipe()) -> str:
    """Write the recipe's missing files into `out` (complete ones are kept); a summary line."""
    started = time.perf_counter()
    out = Path(out)
    train = write_shards(shapes_source(recipe.train_images, recipe.train_seed, recipe.size), out,
                         recipe.per_shard, "train")
    held_out = write_shards(shapes_source(recipe.eval_images, recipe.eval_seed, recipe.size), out,
                            recipe.per_shard, "eval")
    text = out / TEXT_MODEL
    if not text.exists():
        bad: list[str] = []
        captions = list(iter_captions([str(p) for p in recipe.shards(out, "train")], bad))
        if bad:
            raise ValueError(f"unreadable shards {bad}: delete them and run again")
        train_tokenizer(captions, text.with_suffix(""), recipe.vocab_size, model_type="bpe")
    return (f"{out}: shapes data set, {train.shards_written} train and {held_out.shards_written} "
            f"eval shards written ({train.shards_kept + held_out.shards_kept} kept), "
            f"{time.perf_counter() - started:.1f} s")


def ensure_shapes(out: str | Path, recipe: ShapesRecipe = ShapesRecipe()) -> bool:
    """Write the data set into `out` unless it is complete; True when this call wrote it.

    Concurrent callers queue on `out/.lock`; the later ones find the data set complete.
    """
    out = Path(out)
    if all(path.exists() for path in recipe.files(out)):
        return False
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if all(path.exists() for path in recipe.files(out)):
            return False
        print(f"writing the shapes data set into {out} (first use; later runs reuse it)", flush=True)
        print(write_shapes(out, recipe), flush=True)
        return True


def prepare_shapes(data: DataConfig | Any, dist: Dist, recipe: ShapesRecipe = ShapesRecipe()) -> bool:
    """With `data.generate`, rank 0 writes the shapes data set the data config points at.

    The folder is that of the first train shard. Only a missing file that the config names AND the
    recipe writes triggers it (the config may point some keys elsewhere). Every rank takes part in
    one barrier, so the others start reading only once the files are there. True on the writer.
    """
    if not data.generate:
        return False
    wrote = False
    if dist.is_main:
        out = Path(expand_urls(data.train_shards)[0]).parent
        ours = {Path(os.path.abspath(p)) for p in recipe.files(out)}
        named = [url for key in ("train_shards", "eval_shards") if getattr(data, key)
                 for url in expand_urls(getattr(data, key))]
        named += [data.text_tokenizer] if data.text_tokenizer else []
        named_ours = [path for path in map(Path, map(os.path.abspath, named)) if path in ours]
        if not all(path.exists() for path in named_ours):
            wrote = ensure_shapes(out, recipe)
    distributed.barrier()
    return wrote


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(
        prog="python -m parti.data.shapes_dataset",
        description="Write the built-in shapes data set (shards + caption tokenizer) if incomplete.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    wrote = ensure_shapes(args.out)
    if not wrote:
        print(f"{args.out}: shapes data set complete, nothing written")
    return wrote


if __name__ == "__main__":
    main()
