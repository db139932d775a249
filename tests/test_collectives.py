"""Collectives that ranks with different data must still run together (gloo, 2 forked ranks)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parti import distributed
from parti.training.trainer import skipped_totals

SKIPPED = ({"corrupt_image": 2, "missing_caption": 1}, {})  # rank 0 saw bad samples, rank 1 none


def _rank(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        device = torch.device("cpu")
        first = skipped_totals(SKIPPED[rank], device)
        second = skipped_totals({"bad_shard": 1} if rank == 1 else {}, device)
        # the next collective must still pair with the same call on the other rank
        after = distributed.all_reduce_sum(torch.tensor([float(rank + 1)])).item()
        results[rank] = (first, second, after)
    finally:
        dist.destroy_process_group()


def test_skip_counts_reduce_together_when_ranks_skipped_different_things(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(2, str(tmp_path / "init"), results), nprocs=2,
                           start_method="fork")
        outcome = dict(results)
    expected = ({"data/skipped_corrupt_image": 2.0, "data/skipped_missing_caption": 1.0},
                {"data/skipped_bad_shard": 1.0}, 3.0)
    assert outcome[0] == outcome[1] == expected


def test_a_local_rank_without_a_gpu_is_named(monkeypatch):
    # torchrun --nproc_per_node 2 on a node with one visible GPU: rank 1 must not start training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 1 has no GPU: 1 visible .*CUDA_VISIBLE_DEVICES="):
        distributed.init_distributed()
