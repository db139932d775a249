"""Encode image shards into token shards with a frozen stage-1 tokenizer (stage-2 input).

    python -m parti.data.tokenize --shards 'data/shapes/train-{00000..00007}.tar' \
        --tokenizer outputs/demo/vqgan/export --out data/shapes/tokens
    torchrun --nproc_per_node 8 -m parti.data.tokenize --shards ... --tokenizer ... --out ...

Each input shard gives one output shard of the same name holding `KEY.tokens.npy` (int16, or int32
for codebooks over 32767 entries), `KEY.txt` and the original `KEY.json`. Rank r of a torchrun
job encodes shards r, r + world, ...; finished output shards are kept, so a rerun only does the
rest. Bad samples are skipped and counted, as in training. Input shards must have distinct file
names (tokenize shards of several folders into one --out folder each).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from parti import distributed
from parti.data.eval_loader import build_eval_loader
from parti.data.shards import expand_urls
from parti.data.transforms import ImageDecoder
from parti.data.write import write_tar
from parti.models.loading import load_image_tokenizer
from parti.models.vitvqgan import VitVQGAN


class _WithJson:
    """ImageDecoder that also passes the sample's json metadata through (picklable)."""

    def __init__(self, size: int):
        self.decode = ImageDecoder(size, train=False)

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**self.decode(raw, rng), "json": raw.get("json", b"")}


def token_dtype(codebook_size: int) -> type:
    return np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32


@torch.no_grad()
def tokenize_shard(url: str, out_path: Path, tokenizer: VitVQGAN, batch_size: int,
                   device: torch.device, skipped: Counter) -> int:
    """Encode one shard into `out_path`; returns the number of samples written."""
    loader = build_eval_loader([url], _WithJson(tokenizer.cfg.image_size), batch_size=batch_size)
    dtype = token_dtype(tokenizer.quantizer.codebook_size)

    def samples():
        for batch in loader:
            ids = tokenizer.encode(batch["image"].to(device)).flatten(1).cpu().numpy()  # (B, h*w)
            for key, tokens, caption, meta in zip(batch["key"], ids, batch["caption"], batch["json"]):
                sample = {"__key__": key, "tokens.npy": tokens.astype(dtype), "txt": caption}
                if meta:
                    sample["json"] = meta
                yield sample

    count = write_tar(out_path, samples())
    skipped.update(loader.skipped)
    return count


def output_paths(urls: list[str], out: Path) -> list[Path]:
    """OUT/<input shard's file name> for each url; ValueError when two inputs share a name: the
    second would be taken for done (its samples lost), or two ranks would write one file."""
    paths, seen = [], {}
    for url in urls:
        path = out / Path(url.split(":")[-1]).name
        if path in seen:
            raise ValueError(
                f"input shards {seen[path]} and {url} would both be written to {path}: tokenize "
                "each folder into its own --out folder (or list each shard once)"
            )
        seen[path] = url
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="image shards (brace pattern, '::' list)")
    parser.add_argument("--tokenizer", required=True, help="stage-1 export or checkpoint folder")
    parser.add_argument("--out", required=True, help="folder for the token shards")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        urls = expand_urls(args.shards)
        targets = output_paths(urls, out)
    except ValueError as exn:
        parser.error(str(exn))

    dist = distributed.init_distributed()
    tokenizer = load_image_tokenizer(args.tokenizer, dist.device)
    out.mkdir(parents=True, exist_ok=True)
    start, skipped = time.perf_counter(), Counter()
    written = kept = samples = 0
    mine = list(zip(urls, targets))[dist.rank :: dist.world_size]
    for url, target in tqdm(mine, desc=f"tokenize rank {dist.rank}", disable=not dist.is_main):
        if target.exists():
            kept += 1
            continue
        samples += tokenize_shard(url, target, tokenizer, args.batch_size, dist.device, skipped)
        written += 1
    totals = distributed.all_reduce_sum(torch.tensor([written, kept, samples], device=dist.device))
    written, kept, samples = (int(v) for v in totals.tolist())
    if dist.is_main:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        print(f"{out}: wrote {written} token shards ({kept} complete ones kept), {samples} samples, "
              f"skipped on rank 0: {reasons}, {time.perf_counter() - start:.1f} s")
    distributed.shutdown()
    return {"written": written, "kept": kept, "samples": samples}


if __name__ == "__main__":
    main()
