"""Two gloo ranks that read DIFFERENT data against one process, and exact resume under DDP.

Ranks are spawned processes that build the real Trainer (the same code torchrun runs); with
identical data on every rank a missing or mis-scaled all-reduce would go unnoticed, so every rank
here gets its own micro-batches.
"""

from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parti import distributed
from parti.config import validate_parti, validate_vqgan
from parti.distributed.parallel import full_tensors
from parti.training.stage1 import VQGANTask
from parti.training.stage2 import PartiTask
from parti.training.trainer import Trainer, start_run
from tests.conftest import (
    TINY_DATA_SIZE,
    compose_config,
    tiny_parti_overrides,
    tiny_vqgan_overrides,
)

MICRO = 4
STEPS = 3
IMAGE = TINY_DATA_SIZE


class ListLoader:
    """Stands in for the shard loader: the given micro-batches in order, resumable by position."""

    skipped: dict[str, int] = {}

    def __init__(self, batches: list[dict], state: dict | None):
        self.batches = batches
        self.position = state["position"] if state else 0

    def __iter__(self):
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position}


def micro_batch(step: int, rank: int, index: int) -> dict:
    """Images that differ by step, rank and micro-batch (smooth noise in [-1, 1])."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + index)
    coarse = torch.rand(MICRO, 3, IMAGE // 4, IMAGE // 4, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=IMAGE, mode="bilinear")
    return {"image": images, "key": [f"{step}/{rank}/{index}/{i}" for i in range(MICRO)]}


def rank_batches(rank: int, accumulation: int) -> list[dict]:
    return [micro_batch(s, rank, i) for s in range(STEPS) for i in range(accumulation)]


def equivalence_overrides(shapes_dir: Path, run_dir: Path, world: int) -> list[str]:
    """Plain SGD, no clipping, EMA on, dead-code restart after the last update, fp32."""
    base = [o for o in tiny_vqgan_overrides(shapes_dir, run_dir, STEPS)
            if not o.startswith(("model.restart_every=", "model.usage_window=", "lr=",
                                 "trainer.micro_batch=", "trainer.global_batch=",
                                 "trainer.log_every="))]
    return base + ["optim=sgd", "lr=0.5", "trainer.grad_clip=0", "trainer.ema_decay=0.5",
                   "loss.disc_start=1000", "trainer.precision=fp32", f"model.restart_every={STEPS}",
                   f"model.usage_window={STEPS}", f"trainer.micro_batch={MICRO}",
                   f"trainer.global_batch={4 * MICRO}", f"trainer.log_every={STEPS}"]


def train_equivalence(shapes_dir: Path, run_dir: Path, world: int, batches: list[dict]) -> dict:
    """Train the stage-1 task on `batches`; what the comparison needs from this rank."""
    cfg = compose_config("train_vqgan", equivalence_overrides(shapes_dir, run_dir, world))
    run = start_run(cfg, validate_vqgan)
    task = VQGANTask(run)
    task.train_loader = lambda state: ListLoader(batches, state)
    quantizer, seen = task.generator.quantizer, {}
    restart = quantizer.restart_dead_codes

    def recording_restart() -> int:
        seen["totals"] = quantizer.window_counts.sum(0).clone()
        before = quantizer.codebook.detach().clone()
        seen["restarted"] = restart()
        seen["rows"] = (quantizer.codebook.detach() != before).any(1).nonzero().flatten()
        return seen["restarted"]

    quantizer.restart_dead_codes = recording_restart
    trainer = Trainer(run, task)
    trainer.fit()
    model = {k: v.clone() for k, v in task.generator.state_dict().items()}
    ema = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    return {"model": model, "ema": ema, **seen}


def _rank_main(rank: int, world: int, init_file: str, fn, args: tuple, out: str) -> None:
    """A spawned rank: join the gloo group as torchrun would describe it, run fn, save its result."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(fn(rank, *args), f"{out}.{rank}")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        distributed.shutdown()


def spawn(tmp_path: Path, fn, *args, world: int = 2) -> list:
    """fn(rank, *args) on `world` gloo ranks; returns each rank's result."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = str(tmp_path / "result")
    # Forked from a fresh server process that imported this module (torch, parti) once: a rank
    # starts in milliseconds instead of re-importing for ~8 s, and, unlike a fork of the test
    # process, inherits no threads or process group.
    mp.set_forkserver_preload([__name__])
    mp.start_processes(_rank_main, args=(world, str(tmp_path / "init"), fn, args, out),
                       nprocs=world, start_method="forkserver")
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world)]


def _equivalence_rank(rank: int, shapes_dir: Path, run_dir: Path) -> dict:
    return train_equivalence(shapes_dir, run_dir, 2, rank_batches(rank, accumulation=2))


def assert_equal_except_rows(a: dict, b: dict, rows: torch.Tensor) -> int:
    """Every float tensor equal within fp32 tolerance, codebook rows in `rows` left out."""
    compared = 0
    for key, value in a.items():
        if not value.is_floating_point() or key.endswith(("recent", "window_counts")):
            continue
        other = b[key]
        if key.endswith("codebook"):
            keep = torch.ones(len(value), dtype=torch.bool)
            keep[rows] = False
            value, other = value[keep], other[keep]
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)
        compared += 1
    return compared


@pytest.mark.slow
def test_two_ranks_with_different_data_equal_one_process(shapes_dir, tmp_path):
    """2 ranks x accumulation 2 == 1 process x accumulation 4 over the same 4 micro-batches."""
    ranks = spawn(tmp_path / "ddp", _equivalence_rank, shapes_dir, tmp_path / "ddp")
    single_batches = [micro_batch(s, r, i) for s in range(STEPS) for r in range(2)
                      for i in range(2)]
    single = train_equivalence(shapes_dir, tmp_path / "single", 1, single_batches)
    # Restart decisions come from the usage of both ranks' data: the same codes as one process.
    assert single["restarted"] > 0
    for rank in ranks:
        assert torch.equal(rank["totals"], single["totals"])
        assert torch.equal(rank["rows"], single["rows"])
        assert torch.equal(rank["model"]["quantizer.dead_for"], single["model"]["quantizer.dead_for"])
    # Re-seeded rows come from each process's own recent vectors; everything else must agree.
    compared = assert_equal_except_rows(single["model"], ranks[0]["model"], single["rows"])
    assert compared > 10
    assert_equal_except_rows(single["ema"], ranks[0]["ema"], single["rows"])
    assert_equal_except_rows(ranks[0]["model"], ranks[1]["model"], torch.tensor([], dtype=torch.long))


TASKS = {"train_vqgan": (validate_vqgan, VQGANTask), "train_parti": (validate_parti, PartiTask)}


def _resume_rank(rank: int, primary: str, overrides: list[str], stop_at: int, resume: bool
                 ) -> dict[str, torch.Tensor]:
    """Train (stopping after `stop_at` steps when > 0, resuming first when asked); the weights of
    every trained unit and of the EMA, as this rank holds them."""
    validate, task_class = TASKS[primary]
    run = start_run(compose_config(primary, overrides), validate)
    task = task_class(run)
    trainer = Trainer(run, task)
    if resume:
        assert trainer.resume() is not None
    if stop_at:
        trainer.cfg.trainer.steps = stop_at  # the same run cut short (its schedule still spans all)
    trainer.fit()
    return whole_state(trainer)


def whole_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every trained unit's weights and the EMA's, whole (gathered from the shards under FSDP)."""
    state = {f"{name}.{k}": v for name, unit in trainer.task.units.items()
             for k, v in unit.module.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    return {k: v.clone() for k, v in full_tensors(state)}


def assert_resume_is_exact(tmp_path: Path, primary: str, overrides, stop_at: int) -> None:
    straight = spawn(tmp_path / "a", _resume_rank, primary, overrides(tmp_path / "a"), 0, False)
    spawn(tmp_path / "b1", _resume_rank, primary, overrides(tmp_path / "b"), stop_at, False)
    resumed = spawn(tmp_path / "b2", _resume_rank, primary, overrides(tmp_path / "b"), 0, True)
    for rank in range(2):
        assert straight[rank].keys() == resumed[rank].keys()
        for key, value in straight[rank].items():
            assert torch.equal(value, resumed[rank][key]), f"rank {rank}: {key}"


DDP_RESUME = ["trainer.micro_batch=4", "trainer.global_batch=16", "trainer.ema_decay=0.9",
              "trainer.precision=fp32"]  # 2 ranks x accumulation 2


@pytest.mark.slow
def test_stage1_resume_under_ddp_is_exact(shapes_dir, tmp_path):
    """GAN on, dead-code restarts (usage window split by the stop), EMA, accumulation 2."""
    def overrides(run_dir: Path) -> list[str]:
        base = [o for o in tiny_vqgan_overrides(shapes_dir, run_dir, steps=6)
                if not o.startswith(("trainer.micro_batch=", "trainer.global_batch="))]
        return base + DDP_RESUME + ["model.dropout=0.1"]

    assert_resume_is_exact(tmp_path, "train_vqgan", overrides, stop_at=4)


@pytest.mark.slow
def test_stage2_resume_under_ddp_is_exact(shapes_dir, token_dir, tiny_tokenizer, tmp_path):
    def overrides(run_dir: Path) -> list[str]:
        base = [o for o in tiny_parti_overrides(shapes_dir, token_dir, tiny_tokenizer, run_dir, 6)
                if not o.startswith(("trainer.micro_batch=", "trainer.global_batch=",
                                     "model.dropout="))]
        return base + DDP_RESUME + ["model.dropout=0.1", "model.text_dropout=0.3"]

    assert_resume_is_exact(tmp_path, "train_parti", overrides, stop_at=3)


def _draws_after_resume(rank: int, overrides: list[str]) -> torch.Tensor:
    """What this rank's dropout would draw first after resuming the run in `overrides`."""
    run = start_run(compose_config("train_vqgan", overrides), validate_vqgan)
    trainer = Trainer(run, VQGANTask(run))
    assert trainer.resume() is not None
    return torch.rand(8)


@pytest.mark.slow
def test_resuming_with_another_world_size_gives_each_rank_its_own_draws(shapes_dir, tmp_path):
    """A checkpoint of 1 rank resumed by 2: the per-rank RNG states cannot be restored, and the
    ranks must not all draw the same dropout masks from start_run's common seed."""
    overrides = tiny_vqgan_overrides(shapes_dir, tmp_path / "run", steps=2) + [
        "trainer.micro_batch=4"]
    run = start_run(compose_config("train_vqgan", overrides), validate_vqgan)
    Trainer(run, VQGANTask(run)).fit()
    first, second = spawn(tmp_path / "two", _draws_after_resume, overrides)
    assert not torch.equal(first, second)


def _uneven_rank(rank: int, overrides: list[str]) -> dict[str, int]:
    run = start_run(compose_config("train_vqgan", overrides), validate_vqgan)
    task = VQGANTask(run)
    loaders = []
    build_loader = task.train_loader

    def keep(state):
        loaders.append(build_loader(state))
        return loaders[-1]

    task.train_loader = keep
    Trainer(run, task).fit()
    return loaders[0].skipped


@pytest.mark.slow
def test_bad_data_on_one_rank_only_is_counted_and_nobody_waits(shapes_dir, tmp_path):
    """Rank 0 reads corrupt samples, a tar cut mid-member and an empty tar; rank 1 clean shards.
    The run completes and the logged `data/skipped_*` totals are the sums of what each rank met."""
    from tests.test_pipeline import bad_samples_shard, good_shards, truncated_shard, write_tar

    faulty = [bad_samples_shard(tmp_path / "bad.tar")[0],
              truncated_shard(tmp_path / "trunc.tar")[0], write_tar(tmp_path / "empty.tar", [])]
    clean = good_shards(tmp_path, 3, 4)
    shards = [s for pair in zip(faulty, clean) for s in pair]  # rank r reads shards[r::2]
    base = [o for o in tiny_vqgan_overrides(shapes_dir, tmp_path / "run", steps=4)
            if not o.startswith(("data.train_shards=", "trainer.micro_batch=",
                                 "trainer.log_every="))]
    overrides = base + [f"data.train_shards='{'::'.join(shards)}'", "data.shards_per_block=3",
                        "trainer.micro_batch=4", "trainer.log_every=4"]
    ranks = spawn(tmp_path, _uneven_rank, overrides)
    assert ranks[1] == {}
    assert {"corrupt_image", "missing_caption", "bad_shard", "empty_shard"} <= set(ranks[0])
    last = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines()
            if line.split(" ")[2:4] == ["step", "4"]][-1]
    logged = {field.split("=")[0].removeprefix("data/skipped_"): float(field.split("=")[1])
              for field in last.split() if field.startswith("data/skipped_")}
    assert logged == {reason: float(n) for reason, n in ranks[0].items()}


def _signalled_rank(rank: int, overrides: list[str]) -> int:
    run = start_run(compose_config("train_vqgan", overrides), validate_vqgan)
    task = VQGANTask(run)
    step = task.train_step

    def step_then_signal(micro_batches, index):
        out = step(micro_batches, index)
        if rank == 1 and index == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning, on one rank only
        return out

    task.train_step = step_then_signal
    trainer = Trainer(run, task)
    assert trainer.fit() == {}
    return trainer.step


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(shapes_dir, tmp_path):
    overrides = [o for o in tiny_vqgan_overrides(shapes_dir, tmp_path / "run", steps=50)
                 if not o.startswith("trainer.micro_batch=")] + ["trainer.micro_batch=4"]
    stopped = spawn(tmp_path, _signalled_rank, overrides)
    assert stopped[0] == stopped[1] and 3 <= stopped[0] < 50
    assert (tmp_path / "run" / "checkpoints" / f"step-{stopped[0]:07d}" / "COMPLETE").is_file()
