"""Does the stage-2 model draw what its prompts say? The shapes judge on samples for held-out captions.

    python -m parti.eval.generation ckpt=outputs/demo/parti/export n=512 guidance=[1,1.5,3,5]
    python -m parti.eval.generation ckpt=<run>/checkpoints/step-N candidates=[1,4] fid_weights=/w/inception.pth

One image per held-out caption (read from the eval shards, never the training ones) for every
guidance x candidates setting, scored per attribute and split into single- and two-object captions;
beside them the ceilings: the real held-out images and the tokenizer's reconstructions of them.
Prints a markdown table, writes it as JSON and a PNG grid of prompts with their samples, and FID
against the held-out images when an Inception weights file is given. Stage-2 training runs the
sampled rows on a few captions at `trainer.eval_every` (`eval/judge_*`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from parti.config_errors import check_config
from parti.data.eval_loader import build_eval_loader
from parti.data.shapes import parse_caption
from parti.data.shards import expand_urls
from parti.data.transforms import ImageDecoder
from parti.eval.grid import labelled_grid
from parti.eval.shapes_judge import judge
from parti.eval.tokenizer import is_shapes_caption, limited
from parti.models.loading import load_parti
from parti.sampling import SamplingConfig, generate, validate_sampling

SPLITS = ("single", "two")
ATTRIBUTES = ("background", "color", "shape", "size", "position", "relation", "count", "all")
GRID_PROMPTS = 16


def split_of(caption: str) -> str:
    """'single' or 'two': how many objects a shapes caption names."""
    return SPLITS[len(parse_caption(caption).objects) - 1]


def judge_sums(images: Tensor, captions: Sequence[str]) -> dict[str, float]:
    """Per split and attribute, the number of images judged right and the number it applies to.

    Keys `{split}_{attribute}` and `{split}_{attribute}_n`: sums, so ranks can add theirs.
    """
    sums: dict[str, float] = {}
    for image, text in zip(images, captions):
        split = split_of(text)
        for key, ok in judge(image, text).items():
            sums[f"{split}_{key}"] = sums.get(f"{split}_{key}", 0.0) + float(ok)
            sums[f"{split}_{key}_n"] = sums.get(f"{split}_{key}_n", 0.0) + 1.0
    return sums


def judge_means(sums: dict[str, float]) -> dict[str, dict[str, float]]:
    """{split: {attribute: fraction right}} from `judge_sums` (attributes that apply only)."""
    return {split: {a: sums[f"{split}_{a}"] / sums[f"{split}_{a}_n"] for a in ATTRIBUTES
                    if sums.get(f"{split}_{a}_n", 0.0) > 0}
            for split in SPLITS}


def settings(guidance: Sequence[float], candidates: Sequence[int], base: SamplingConfig
             ) -> list[SamplingConfig]:
    """Every guidance x candidates combination, other values from `base`."""
    return [SamplingConfig(float(g), base.temperature, base.top_k, base.top_p, int(k))
            for k in candidates for g in guidance]


def setting_name(cfg: SamplingConfig) -> str:
    rerank = f", best of {cfg.candidates}" if cfg.candidates > 1 else ""
    return f"guidance {cfg.guidance:g}{rerank}"


@dataclass
class GenerationEvalConfig:
    """`python -m parti.eval.generation KEY=VALUE ...`."""

    ckpt: str = "outputs/demo/parti/export"  # stage-2 export or checkpoint folder
    shards: str = "data/shapes/eval-00000.tar"  # held-out image shards (never the training ones)
    n: int = 512  # held-out captions, one sample each per setting
    guidance: list[float] = field(default_factory=lambda: [1.0, 1.5, 3.0, 5.0])
    candidates: list[int] = field(default_factory=lambda: [1])  # >1: reranked rows (best of K)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 128
    fid_weights: str = ""  # Inception weights file for FID ('' = FID skipped, with a note)
    out: str = ""  # folder for generation.json, generation.md, generation.png; '' = <ckpt>/..


def validate(cfg: GenerationEvalConfig) -> None:
    """Reject impossible values naming the key."""
    for key in ("n", "batch_size"):
        check_config(getattr(cfg, key) >= 1, key, f"{getattr(cfg, key)} must be >= 1")
    for key in ("guidance", "candidates"):
        check_config(bool(getattr(cfg, key)), key, "needs at least one value")
    for setting in settings(cfg.guidance, cfg.candidates,
                            SamplingConfig(1.0, cfg.temperature, cfg.top_k, cfg.top_p)):
        validate_sampling(setting)


def held_out(shards: str, n: int, image_size: int) -> tuple[Tensor, list[str]]:
    """The first n images (n, 3, H, W) in [-1, 1] and captions of the eval shards."""
    loader = build_eval_loader(expand_urls(shards), ImageDecoder(image_size, train=False),
                               batch_size=min(n, 256))
    images, captions = [], []
    for batch in limited(loader, n):
        images.append(batch["image"])
        captions += list(batch["caption"])
    if not captions:
        raise RuntimeError(f"no held-out samples in {shards}")
    if not all(is_shapes_caption(c) for c in captions):
        raise ValueError(f"{shards} holds captions the shapes judge cannot read: the judge "
                         "scores shapes data only (python -m parti.data.write --from-shapes ...)")
    return torch.cat(images), captions


def _row(name: str, sums: dict[str, float], seconds: float, fid: float | None,
         sampling: SamplingConfig | None) -> dict:
    row = {"name": name, **judge_means(sums), "fid": fid, "seconds": round(seconds, 2)}
    if sampling is not None:
        row["sampling"] = vars(sampling)
    return row


def markdown_table(rows: list[dict]) -> str:
    """One line per row: every attribute of both splits."""
    cols = [(s, a) for s in SPLITS for a in ATTRIBUTES if any(a in r[s] for r in rows)]
    head = "| images | " + " | ".join(f"{s} {a}" for s, a in cols) + " | FID |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        cells = [f"{r[s][a]:.3f}" if a in r[s] else "" for s, a in cols]
        fid = f"{r['fid']:.2f}" if r["fid"] is not None else "-"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {fid} |")
    return "\n".join(lines)


def evaluate_generation(cfg: GenerationEvalConfig,
                        log: Callable[[str], None] = print) -> dict:
    """The whole evaluation (see the module docstring); returns what generation.json holds."""
    validate(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, text_tokenizer, image_tokenizer = load_parti(cfg.ckpt, device)
    real, captions = held_out(cfg.shards, cfg.n, image_tokenizer.cfg.image_size)
    fid_of = _fid_function(cfg.fid_weights, real, device)
    rows, grid_columns = [], []
    start = time.perf_counter()
    recon = torch.cat([image_tokenizer.decode(image_tokenizer.encode(chunk.to(device))).float()
                       .clamp(-1, 1).cpu() for chunk in real.split(cfg.batch_size)])
    for name, images in (("real held-out images", real), ("tokenizer reconstructions", recon)):
        rows.append(_row(name, judge_sums(images, captions), time.perf_counter() - start,
                         fid_of(images), None))
        grid_columns.append(images[:GRID_PROMPTS])
        start = time.perf_counter()
    base = SamplingConfig(1.0, cfg.temperature, cfg.top_k, cfg.top_p)
    for sampling in settings(cfg.guidance, cfg.candidates, base):
        start = time.perf_counter()
        images = generate(model, text_tokenizer, image_tokenizer, captions, sampling, cfg.seed,
                          batch_size=cfg.batch_size).images.cpu()
        rows.append(_row(setting_name(sampling), judge_sums(images, captions),
                         time.perf_counter() - start, fid_of(images), sampling))
        grid_columns.append(images[:GRID_PROMPTS])
        log(f"{setting_name(sampling)}: {rows[-1]['seconds']} s")
    counts = {s: sum(split_of(c) == s for c in captions) for s in SPLITS}
    result = {"ckpt": cfg.ckpt, "shards": cfg.shards, "n": len(captions), "captions": counts,
              "seed": cfg.seed, "fid": "computed" if cfg.fid_weights else
              "skipped: set fid_weights=/path/to/inception weights (eval.fid_weights in training)",
              "rows": rows}
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "generation.md").write_text(table + "\n")
    shown = min(GRID_PROMPTS, len(captions))
    columns = torch.stack([c[:shown] for c in grid_columns], dim=1).flatten(0, 1)
    labelled_grid(columns, captions[:shown], len(grid_columns)).save(out / "generation.png")
    log(f"{len(captions)} held-out captions ({counts['single']} single-object, {counts['two']} "
        f"two-object) of {cfg.shards}; grid columns: {', '.join(r['name'] for r in rows)}")
    log(table)
    log(f"wrote {out}/generation.json, generation.md, generation.png; FID {result['fid']}")
    return result


def _fid_function(weights: str, real: Tensor, device: torch.device
                  ) -> Callable[[Tensor], float | None]:
    """images -> FID against `real`, or -> None when no weights file is configured."""
    if not weights:
        return lambda images: None
    from parti.eval.fid import fid_against

    return fid_against(real, weights, device=device, key="fid_weights")


def sampled_judge_metrics(
    model, text_tokenizer, image_tokenizer, captions: Iterable[str],
    settings_: Sequence[SamplingConfig], seed: int, batch_size: int,
    reduce: Callable[[dict[str, float]], dict[str, float]] = dict,
) -> dict[str, float]:
    """`eval/judge_{split}_{attribute}_g{guidance}[_k{candidates}]` for in-training evaluation.

    `reduce` sums the per-rank sums (every rank calls it once per setting, whatever its data).
    """
    captions = [c for c in captions if is_shapes_caption(c)]
    metrics: dict[str, float] = {}
    for sampling in settings_:
        sums: dict[str, float] = {}
        if captions:
            images = generate(model, text_tokenizer, image_tokenizer, captions, sampling, seed,
                              batch_size=batch_size).images.cpu()
            sums = judge_sums(images, captions)
        sums = reduce(sums)
        tag = f"g{sampling.guidance:g}" + (f"_k{sampling.candidates}" if sampling.candidates > 1
                                           else "")
        for split, values in judge_means(sums).items():
            for attribute, value in values.items():
                metrics[f"eval/judge_{split}_{attribute}_{tag}"] = value
    return metrics


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GenerationEvalConfig),
                                              OmegaConf.from_dotlist(args)))
    return evaluate_generation(cfg)


if __name__ == "__main__":
    main()
