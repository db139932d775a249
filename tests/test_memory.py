"""The computed per-GPU memory table of the README (`python -m parti.distributed.memory`)."""

from __future__ import annotations

import pytest

from parti.distributed.memory import GB, SIZES, counts, estimate, fewest_gpus, model_config, table


@pytest.fixture(scope="module")
def parti_20b():
    return model_config("parti_20b")


def test_ddp_holds_sixteen_bytes_per_parameter_on_every_gpu(parti_20b):
    params, _ = counts(parti_20b)
    assert 20e9 < params < 21e9
    for gpus in (8, 64):
        e = estimate(parti_20b, gpus, "ddp", micro_batch=8, checkpointing=False)
        assert e.weights + e.gradients + e.optimizer == 16 * params  # ~330 GB: never fits


def test_fsdp_shards_state_and_checkpointing_shrinks_activations(parti_20b):
    params, block = counts(parti_20b)
    on8 = estimate(parti_20b, 8, "fsdp", 8, checkpointing=False)
    on64 = estimate(parti_20b, 64, "fsdp", 8, checkpointing=False)
    assert on8.optimizer == 8 * params / 8 and on64.optimizer == 8 * params / 64
    assert on8.weights == 4 * params / 8 + 4 * block  # two bf16 blocks in flight
    with_ac = estimate(parti_20b, 8, "fsdp", 8, checkpointing=True)
    assert with_ac.activations < on8.activations / 10
    assert with_ac.total < 0.9 * 80 * GB < on8.total


def test_fewest_gpus_is_the_smallest_power_of_two_that_fits(parti_20b):
    n = fewest_gpus(parti_20b, 8, 80 * GB)
    assert n == 8
    assert estimate(parti_20b, n // 2, "fsdp", 8, True).total > 0.9 * 80 * GB
    assert fewest_gpus(model_config("parti_350m"), 8, 80 * GB) == 1


def test_table_has_a_row_per_size_and_strategy():
    text = table()
    for name in SIZES:
        assert sum(line.startswith(f"| {name} |") for line in text.splitlines()) == 3
    assert "parti_20b: 8" in text
