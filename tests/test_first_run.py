"""First use of the built-in shapes data: written once by one writer, deterministic, reused."""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parti.config import DataConfig, validate_vqgan
from parti.data.shapes_dataset import ShapesRecipe, ensure_shapes, prepare_shapes
from parti.distributed import Dist
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ShapesRecipe(train_images=24, eval_images=8, per_shard=8, size=16, vocab_size=64)
ALONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in the folder but the lock."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.name != ".lock"}


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per file: a rewrite (a new file renamed into place) changes them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def data_config(out: Path, generate: bool = True) -> DataConfig:
    return DataConfig(name="shapes", train_shards=f"{out}/train-{{00000..00002}}.tar",
                      eval_shards=f"{out}/eval-00000.tar", text_tokenizer=f"{out}/text.model",
                      generate=generate)


def test_the_recipe_is_deterministic_and_a_second_call_reuses_it(tmp_path):
    assert ensure_shapes(tmp_path / "a", TINY) and ensure_shapes(tmp_path / "b", TINY)
    names = [p.name for p in TINY.files(tmp_path)]
    assert names == ["train-00000.tar", "train-00001.tar", "train-00002.tar", "eval-00000.tar",
                     "text.model"]
    assert list(digests(tmp_path / "a")) == sorted(names)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    before = stamps(tmp_path / "a")
    assert not ensure_shapes(tmp_path / "a", TINY)
    assert stamps(tmp_path / "a") == before


def test_a_killed_first_run_is_completed_and_its_complete_files_kept(tmp_path):
    ensure_shapes(tmp_path / "ref", TINY)
    out = tmp_path / "killed"
    ensure_shapes(out, TINY)
    (out / "text.model").unlink()  # killed while training the tokenizer (written last) ...
    (out / "train-00002.tar").unlink()
    (out / "train-00002.tar.tmp").write_bytes(b"half a shard")  # ... or while writing a shard
    kept = stamps(out)["train-00000.tar"]
    assert ensure_shapes(out, TINY)
    assert digests(out) == digests(tmp_path / "ref")
    assert stamps(out)["train-00000.tar"] == kept


def test_generate_writes_only_missing_files_the_config_names_and_the_recipe_makes(tmp_path):
    assert not prepare_shapes(data_config(tmp_path / "off", generate=False), ALONE, TINY)
    assert not (tmp_path / "off").exists()
    own = data_config(tmp_path / "own")  # the config names other shards: nothing to generate
    own.train_shards, own.text_tokenizer = str(tmp_path / "mine.tar"), ""
    assert not prepare_shapes(own, ALONE, TINY)
    assert not (tmp_path / "own").exists()
    assert prepare_shapes(data_config(tmp_path / "on"), ALONE, TINY)
    assert digests(tmp_path / "on").keys() == {p.name for p in TINY.files(tmp_path)}
    assert not prepare_shapes(data_config(tmp_path / "on"), ALONE, TINY)


def test_generate_needs_local_train_shards():
    pipe = "data.train_shards='pipe:curl -s http://host/a.tar'"
    with pytest.raises(ValueError, match="data.generate: writes the shapes data set next to"):
        validate_vqgan(compose_config("train_vqgan", [pipe]))
    validate_vqgan(compose_config("train_vqgan", [pipe, "data.generate=false"]))


def _rank(rank: int, world: int, init_file: str, out: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a collective mismatch fails
    try:
        me = Dist(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        wrote = prepare_shapes(data_config(Path(out)), me, TINY)
        results[rank] = (wrote, digests(Path(out)), stamps(Path(out)))  # right after the barrier
    finally:
        dist.destroy_process_group()


def test_two_ranks_starting_together_end_with_one_writer(tmp_path):
    ensure_shapes(tmp_path / "ref", TINY)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "data"), results),
                           nprocs=2, start_method="fork")
        (wrote0, seen0, stamps0), (wrote1, seen1, stamps1) = results[0], results[1]
    assert (wrote0, wrote1) == (True, False)
    assert seen0 == seen1 == digests(tmp_path / "ref")  # rank 1 reads only complete data
    assert stamps0 == stamps1 == stamps(tmp_path / "data")  # written once


def _process(index: int, out: str, results: dict) -> None:
    results[index] = ensure_shapes(Path(out), TINY)


def test_two_jobs_starting_together_queue_on_the_lock(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    with mp.Manager() as manager, open(out / ".lock", "w") as lock:
        results = manager.dict()
        fcntl.flock(lock, fcntl.LOCK_EX)  # both jobs find the data missing and wait for the lock
        jobs = mp.start_processes(_process, args=(str(out), results), nprocs=2, join=False,
                                  start_method="fork")
        time.sleep(1.0)
        fcntl.flock(lock, fcntl.LOCK_UN)
        while not jobs.join():
            pass
        assert sorted(results.values()) == [False, True]
    ensure_shapes(tmp_path / "ref", TINY)
    assert digests(tmp_path / "data") == digests(tmp_path / "ref")


@pytest.mark.slow
def test_train_parti_without_a_tokenizer_says_how_to_make_one_before_any_work(tmp_path):
    data = tmp_path / "shapes"
    done = subprocess.run(
        [sys.executable, "train_parti.py", f"tokenizer.ckpt={tmp_path}/none",
         f"data.train_shards='{data}/train-{{00000..00007}}.tar'",
         f"data.eval_shards={data}/eval-00000.tar", f"data.text_tokenizer={data}/text.model",
         f"run_dir={tmp_path}/run"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode != 0
    assert "python train_vqgan.py experiment=demo_vqgan" in done.stderr
    assert f"tokenizer.ckpt: {tmp_path}/none does not exist" in done.stderr
    assert not data.exists() and not (tmp_path / "run").exists()
