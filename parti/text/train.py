"""Train the SentencePiece caption tokenizer on the captions (`.txt`) of WebDataset shards.

    python -m parti.text.train --shards 'data/shapes/shard-{00000..00009}.tar' --out data/spm/shapes
    python -m parti.text.train --shards 'a/{00000..00127}.tar::b/{000..009}.tar' --out spm/cc \\
        --vocab-size 16000 --max-samples 2000000

Writes PATH_PREFIX.model with pad 0, unk 1, bos 2, eos 3. A corpus too small for the asked
vocabulary gets the largest vocabulary SentencePiece can build from it.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from parti.data.shards import ShardError, check_shards_exist, expand_urls, read_shard
from parti.text.tokenizer import TextTokenizer

SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
_TOO_HIGH = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def iter_captions(urls: str | Sequence[str], bad_shards: list[str]) -> Iterator[str]:
    """Non-empty captions of all shards in order; unreadable shards are appended to bad_shards."""
    shards = expand_urls(urls)
    check_shards_exist(shards)
    for url in shards:
        try:
            for raw in read_shard(url, exts={"txt"}):
                caption = raw.get("txt", b"").decode("utf-8", errors="replace").strip()
                if caption:
                    yield caption
        except ShardError:
            bad_shards.append(url)


def train_tokenizer(
    captions: Iterable[str],
    out_prefix: str | Path,
    vocab_size: int = 16000,
    model_type: str = "unigram",
) -> Path:
    """Train on the captions, write OUT_PREFIX.model atomically and return its path.

    The vocabulary is clipped to the largest size the corpus allows.
    """
    corpus = [caption for caption in captions if caption.strip()]
    if not corpus:
        raise ValueError("no captions to train the tokenizer on")
    path = Path(f"{out_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    size = vocab_size
    while True:
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus),
                model_writer=model,
                vocab_size=size,
                model_type=model_type,
                num_threads=min(16, os.cpu_count() or 1),
                minloglevel=2,
                **SPECIAL_IDS,
            )
            break
        except RuntimeError as exn:
            too_high, too_low = _TOO_HIGH.search(str(exn)), _TOO_LOW.search(str(exn))
            if too_high and int(too_high.group(1)) < size:
                size = int(too_high.group(1))
            elif too_low:
                raise ValueError(
                    f"vocab size {size} is below the {too_low.group(2)} pieces this corpus needs "
                    "(its characters plus the 4 special ids); ask for more"
                ) from exn
            else:
                raise
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m parti.text.train",
        description="Train the SentencePiece caption tokenizer on the captions of shards.",
    )
    parser.add_argument("--shards", required=True, help="shard urls: brace patterns, '::'-joined")
    parser.add_argument("--out", required=True, help="output path prefix (writes PREFIX.model)")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--max-samples", type=int, default=None, help="first N captions only")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    args = parser.parse_args(argv)
    if args.vocab_size < 5 or (args.max_samples is not None and args.max_samples < 1):
        parser.error("--vocab-size must be >= 5 and --max-samples >= 1")
    bad_shards: list[str] = []
    try:
        captions = list(itertools.islice(iter_captions(args.shards, bad_shards), args.max_samples))
        path = train_tokenizer(captions, args.out, args.vocab_size, args.model_type)
    except (FileNotFoundError, ValueError) as exn:
        parser.error(str(exn))
    vocab = TextTokenizer(path).vocab_size
    print(
        f"{path}: SentencePiece {args.model_type}, vocab {vocab} (asked {args.vocab_size}), "
        f"{len(captions)} captions, {len(bad_shards)} unreadable shards skipped"
    )
    return path


if __name__ == "__main__":
    main()
