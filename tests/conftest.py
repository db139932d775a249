"""Shared fixtures: a tiny shapes data set (shards + text tokenizer) and Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from parti.config import register_configs
from parti.data.write import shapes_source, write_shards
from parti.text.train import train_tokenizer

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one compute thread each (and in the processes a test
    # starts), not two apiece contending for the same cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first: `make test`'s workers (pytest-xdist, `--dist load --maxschedchunk 1`)
    take tests one by one in this order, so the longest never start last and leave the other
    workers idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

TINY_DATA_SIZE = 32


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """4 train shards x 64 and 1 eval shard x 32 shapes images at 32 px, plus a text tokenizer."""
    root = tmp_path_factory.mktemp("shapes")
    write_shards(shapes_source(256, seed=0, size=TINY_DATA_SIZE), root, per_shard=64, prefix="train")
    write_shards(shapes_source(32, seed=1, size=TINY_DATA_SIZE), root, per_shard=64, prefix="eval")
    from parti.data.shapes import generate

    captions = [c for _, _, c, _ in generate(2000, seed=0, size=16)]
    train_tokenizer(captions, str(root / "text"), vocab_size=128, model_type="bpe")
    return root


def record_losses(task, key: str) -> list[float]:
    """Wrap `task.train_step` so that every step appends its `key` scalar to the returned list."""
    losses: list[float] = []
    step = task.train_step

    def recording(micro_batches, index):
        out = step(micro_batches, index)
        losses.append(float(out[key]))
        return out

    task.train_step = recording
    return losses


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """The config `python {name}.py <overrides>` would run with (without Hydra's own section)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def tiny_vqgan_overrides(shapes_dir: Path, run_dir: Path, steps: int = 6) -> list[str]:
    """A seconds-long stage-1 run on the tiny shapes data (GAN on from step 2)."""
    return [
        f"data.train_shards='{shapes_dir}/train-{{00000..00003}}.tar'",
        f"data.eval_shards={shapes_dir}/eval-00000.tar",
        f"data.image_size={TINY_DATA_SIZE}", f"model.image_size={TINY_DATA_SIZE}",
        "data.num_workers=0", "data.eval_samples=16", "data.shuffle_buffer=32",
        "model.patch_size=8", "model.enc_dim=32", "model.enc_layers=1", "model.enc_heads=2", "model.enc_mlp_dim=64",
        "model.dec_dim=32", "model.dec_layers=1", "model.dec_heads=2", "model.dec_mlp_dim=64",
        "model.codebook_size=64", "model.code_dim=8", "model.restart_every=3",
        "model.usage_window=3", "model.disc.channels=4", "model.disc.max_channels=8",
        "loss.disc_start=2", "optim.warmup_steps=0", "lr=1e-3",
        f"trainer.steps={steps}", "trainer.micro_batch=8", "trainer.global_batch=8",
        "trainer.log_every=2", "trainer.eval_every=0", "trainer.image_every=0",
        "trainer.ckpt_every=0", "trainer.progress=false", f"run_dir={run_dir}",
    ]


@pytest.fixture(scope="session")
def tiny_tokenizer(shapes_dir, tmp_path_factory) -> Path:
    """The export folder of a tiny stage-1 tokenizer trained for a few steps on the shapes data."""
    from parti.config import validate_vqgan
    from parti.training.stage1 import VQGANTask
    from parti.training.trainer import Trainer, start_run

    run_dir = tmp_path_factory.mktemp("tokenizer")
    cfg = compose_config("train_vqgan", tiny_vqgan_overrides(shapes_dir, run_dir, steps=4))
    run = start_run(cfg, validate_vqgan)
    task = VQGANTask(run)
    trainer = Trainer(run, task)
    trainer.fit()
    trainer.export(run_dir / "export")
    return run_dir / "export"


@pytest.fixture(scope="session")
def token_dir(shapes_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """Token shards of the tiny shapes data made by `python -m parti.data.tokenize`."""
    from parti.data.tokenize import main as tokenize

    out = tmp_path_factory.mktemp("tokens")
    shards = f"{shapes_dir}/train-{{00000..00003}}.tar::{shapes_dir}/eval-00000.tar"
    tokenize(["--shards", shards, "--tokenizer", str(tiny_tokenizer), "--out", str(out)])
    return out


def tiny_parti_overrides(shapes_dir: Path, token_dir: Path, tokenizer: Path, run_dir: Path,
                         steps: int = 6) -> list[str]:
    """A seconds-long stage-2 run on the tiny token shards (4x4 image tokens, 64 codes)."""
    return [
        f"data.train_shards='{shapes_dir}/train-{{00000..00003}}.tar'",
        f"data.eval_shards={shapes_dir}/eval-00000.tar",
        f"data.token_train_shards='{token_dir}/train-{{00000..00003}}.tar'",
        f"data.token_eval_shards={token_dir}/eval-00000.tar",
        f"data.text_tokenizer={shapes_dir}/text.model", f"tokenizer.ckpt={tokenizer}",
        f"data.image_size={TINY_DATA_SIZE}", "data.num_workers=0", "data.eval_samples=16",
        "data.shuffle_buffer=32", "model.vocab_size=128", "model.text_len=24",
        "model.codebook_size=64", "model.image_grid=4", "model.dim=32", "model.heads=2",
        "model.mlp_dim=64", "model.enc_layers=1", "model.dec_layers=1", "model.dropout=0.0",
        "optim.warmup_steps=0", "lr=3e-3", "sample.prompts=[a red circle]",
        f"trainer.steps={steps}", "trainer.micro_batch=8", "trainer.global_batch=8",
        "trainer.log_every=2", "trainer.eval_every=0", "trainer.image_every=0",
        "trainer.ckpt_every=0", "trainer.progress=false", f"run_dir={run_dir}",
    ]
