"""The whole training loop of each demo model: shard-loader-fed against in-memory batches, and the
trainer's step (task step + EMA, as `Trainer.fit` runs it) against the bare model step.

The bare model starts from the task model's weights and follows the same lr schedule: the step's
cost depends on the weights (demo_vqgan's code-entropy term meets slow denormal floats more or less
often depending on the codebook).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from parti.config import register_configs, validate_parti, validate_vqgan
from parti.data.shards import expand_urls, read_shard
from parti.data.write import write_tar
from parti.models.vitvqgan import VitVQGAN, VitVQGANConfig
from parti.training import stage2
from parti.training.ema import EMA
from parti.training.optim import build_optimizer, build_scheduler
from parti.training.stage1 import VQGANTask
from parti.training.trainer import start_run

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config of `python {name}.py <overrides>`."""
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def compose_demo(stage: str, overrides: list[str]) -> DictConfig:
    """The config of `python train_{stage}.py experiment=demo_{stage} <overrides>`."""
    return compose_config(f"train_{stage}", [f"experiment=demo_{stage}", *overrides])


def write_token_shards(image_shards: str, out: Path, grid: int, codebook_size: int,
                       per_shard: int) -> str:
    """Token shards (random tokens, the image shards' captions): the stage-2 loader's input without
    a trained tokenizer. Returns their brace pattern."""
    urls = expand_urls(image_shards)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, url in enumerate(urls):
        raw = itertools.islice(read_shard(url, exts={"txt"}), per_shard)
        write_tar(out / f"train-{i:05d}.tar", (
            {"__key__": s["__key__"], "txt": s["txt"],
             "tokens.npy": rng.integers(0, codebook_size, grid * grid).astype(np.int16)}
            for s in raw))
    return f"{out}/train-{{00000..{len(urls) - 1:05d}}}.tar"


def _optimizer(model, cfg: DictConfig):
    """The run's optimizer and lr schedule: the bare step's weights then move as the trainer's do."""
    optimizer = build_optimizer(model, cfg.optim)
    return optimizer, build_scheduler(optimizer, cfg.optim, cfg.trainer.steps)


def _trainer_step(task, ema: EMA | None) -> Callable[[list[dict]], None]:
    """What `Trainer.fit` does per step once the batch is there: the task's step, then the EMA."""
    model = task.units["model"].module
    steps = itertools.count()

    def step(micro_batches: list[dict]) -> None:
        task.train_step(micro_batches, next(steps))
        if ema is not None:
            ema.update(model)

    return step


def _contenders(task, cfg: DictConfig) -> dict:
    """Loader-fed and in-memory trainer steps, and the in-memory batch (`fixed`)."""
    ema = EMA(task.units["model"].module, cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None
    step = _trainer_step(task, ema)
    batches = iter(task.train_loader(None))
    fixed = next(batches)
    return {"loader": lambda: step([next(batches)]), "memory": lambda: step([fixed]),
            "fixed": fixed}


def vqgan(run_dir: Path, shards: str, overrides: list[str] = ()) -> dict:
    """demo_vqgan: the three step closures and the batch size."""
    cfg = compose_demo("vqgan", [f"run_dir={run_dir}", f"data.train_shards='{shards}'",
                                 *overrides])
    task = VQGANTask(start_run(cfg, validate_vqgan))
    model = VitVQGAN(OmegaConf.to_object(cfg.model))
    model.load_state_dict(task.units["model"].module.state_dict())  # same weights, same cost
    optimizer, scheduler = _optimizer(model, cfg)
    contenders = _contenders(task, cfg)
    images = contenders.pop("fixed")["image"]
    disc = task.units["disc"].module

    def bare() -> None:
        recon, quant = model(images)
        task.loss.generator_loss(images, recon, quant, 0, disc)["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    return {**contenders, "bare": bare, "batch": cfg.trainer.micro_batch}


def parti(run_dir: Path, token_shards: str, text_model: str, overrides: list[str] = ()) -> dict:
    """demo_parti (its image tokenizer replaced by an untrained one of the same shape)."""
    cfg = compose_demo("parti", [f"run_dir={run_dir}", f"data.token_train_shards='{token_shards}'",
                                 f"data.text_tokenizer={text_model}", *overrides])
    grid = cfg.model.image_grid
    tokenizer = VitVQGAN(VitVQGANConfig(image_size=4 * grid, patch_size=4,
                                        codebook_size=cfg.model.codebook_size)).eval()
    with mock.patch.object(stage2, "load_image_tokenizer", lambda path, device: tokenizer):
        task = stage2.PartiTask(start_run(cfg, validate_parti))
    model = stage2.Parti(OmegaConf.to_object(cfg.model))
    model.load_state_dict(task.units["model"].module.state_dict())
    optimizer, scheduler = _optimizer(model, cfg)
    contenders = _contenders(task, cfg)
    fixed = contenders.pop("fixed")
    ids, mask = task.text_tokenizer.encode(fixed["caption"], cfg.model.text_len)
    tokens = fixed["tokens"].long()

    def bare() -> None:
        logits = model(ids, mask, tokens).float()
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    return {**contenders, "bare": bare, "batch": cfg.trainer.micro_batch}
