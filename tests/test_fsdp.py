"""FSDP (`trainer.strategy=fsdp`) on gloo ranks: equal to DDP, checkpoints that reshard, exact resume;
a sharded root that returns its logits without FSDP2's warning about views.

Every rank reads its own token shards (the loader splits them by rank), so a wrong gradient
reduction changes the result.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from parti.config import validate_parti
from parti.distributed import Dist
from parti.distributed.checkpoint import read_tensors
from parti.distributed.parallel import full_tensors, parallelize
from parti.models.layers import TransformerBlock
from parti.models.parti import Parti, PartiConfig
from parti.training.stage2 import PartiTask
from parti.training.trainer import Trainer, start_run
from tests.conftest import compose_config, tiny_parti_overrides
from tests.test_ddp import assert_resume_is_exact, spawn, whole_state

FSDP = ["trainer.strategy=fsdp"]
# 2 ranks x micro-batch 4 x accumulation 2; dropout, text dropout, clipping and EMA all on.
COMMON = ["trainer.micro_batch=4", "trainer.global_batch=16", "trainer.ema_decay=0.9",
          "trainer.precision=fp32", "trainer.grad_clip=0.5", "model.dropout=0.1",
          "model.text_dropout=0.3", "eval.n=4"]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # fp32: reduce-scatter vs all-reduce summation order


@pytest.fixture
def overrides(shapes_dir, token_dir, tiny_tokenizer):
    def make(run_dir: Path, steps: int, extra: list[str]) -> list[str]:
        base = [o for o in tiny_parti_overrides(shapes_dir, token_dir, tiny_tokenizer, run_dir, steps)
                if not o.startswith(("trainer.micro_batch=", "trainer.global_batch=",
                                     "model.dropout="))]
        return base + COMMON + extra
    return make


def _trained(rank: int, overrides: list[str]) -> dict[str, torch.Tensor]:
    """Train and export (as train_parti.py does); the whole weights and EMA."""
    run = start_run(compose_config("train_parti", overrides), validate_parti)
    trainer = Trainer(run, PartiTask(run))
    trainer.fit()
    trainer.export(run.run_dir / "export")
    return whole_state(trainer)


def _resumed(rank: int, overrides: list[str]) -> dict[str, torch.Tensor]:
    """Weights, EMA and optimizer moments, whole, right after resuming."""
    run = start_run(compose_config("train_parti", overrides), validate_parti)
    trainer = Trainer(run, PartiTask(run))
    assert trainer.resume() is not None
    unit = trainer.task.units["model"]
    moments = {f"optimizer.{fqn}.{k}": v
               for fqn, state in get_optimizer_state_dict(unit.module, unit.optimizer)["state"].items()
               for k, v in state.items()}
    return {**whole_state(trainer), **{k: v.clone() for k, v in full_tensors(moments)},
            "step": torch.tensor(trainer.step)}


def saved(checkpoint: Path) -> dict[str, torch.Tensor]:
    """What a checkpoint holds, read whole in this process, keyed like `_resumed`."""
    tensors = checkpoint / "tensors"
    return {**{f"model.{k}": v for k, v in read_tensors(tensors, ("units", "model", "model")).items()},
            **{f"ema.{k}": v for k, v in read_tensors(tensors, ("ema",)).items()},
            **{f"optimizer.{k}": v
               for k, v in read_tensors(tensors, ("units", "model", "optimizer")).items()}}


def assert_holds(loaded: dict, expected: dict, step: int) -> None:
    assert int(loaded.pop("step")) == step
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("bias", [True, False])
def test_a_sharded_parti_returns_its_logits_as_a_tensor_not_a_view(bias):
    """FSDP2 warns when a sharded root returns a view: an in-place edit of it would skip the
    gradient all-gather. nn.Linear with a bias returns one for (B, T, D) input."""
    owned = not dist.is_initialized()
    torch.manual_seed(0)
    model = Parti(PartiConfig(dropout=0.0, image_grid=4, bias=bias))
    parallelize(model, "fsdp", Dist(0, 1, 0, torch.device("cpu")), "fp32", False, False,
                (TransformerBlock,))
    ids = torch.randint(1, 512, (2, 32))
    tokens = torch.randint(0, 512, (2, 16))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits = model(ids, torch.ones_like(ids, dtype=torch.bool), tokens)
        assert logits._base is None
        assert not [w for w in caught if "view" in str(w.message)], [str(w.message) for w in caught]
        logits.logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        if owned:
            dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_equals_ddp_after_four_steps(overrides, tmp_path):
    """FSDP with activation checkpointing against DDP without, same data per rank."""
    ddp = spawn(tmp_path / "d", _trained, overrides(tmp_path / "ddp", 4, []))
    fsdp = spawn(tmp_path / "f", _trained, overrides(
        tmp_path / "fsdp", 4, FSDP + ["trainer.activation_checkpointing=true"]))
    assert ddp[0].keys() == fsdp[0].keys()
    worst = 0.0
    for rank in range(2):
        for key, value in ddp[rank].items():
            torch.testing.assert_close(fsdp[rank][key], value, **TOLERANCE, msg=key)
            worst = max(worst, float((fsdp[rank][key] - value).abs().max()))
    print(f"largest |FSDP - DDP| after 4 steps: {worst:.3g}")
    exported = load_file(tmp_path / "fsdp" / "export" / "model.safetensors")  # EMA, one whole file
    assert exported.keys() == {k.removeprefix("ema.") for k in fsdp[0] if k.startswith("ema.")}
    for key, value in exported.items():
        assert torch.equal(value, fsdp[0][f"ema.{key}"]), key


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_ranks_loads_into_one_and_two_and_into_ddp(overrides, tmp_path):
    run_dir = tmp_path / "run"
    spawn(tmp_path / "w", _trained, overrides(run_dir, 3, FSDP))
    checkpoint = run_dir / "checkpoints" / "step-0000003"
    expected = saved(checkpoint)
    assert any(k.endswith("exp_avg_sq") for k in expected)
    resume = [f"resume={checkpoint}"]
    for world, strategy in ((1, "fsdp"), (2, "fsdp"), (2, "ddp")):
        loaded = spawn(tmp_path / f"{strategy}{world}", _resumed, overrides(
            tmp_path / f"to_{strategy}{world}", 3, [f"trainer.strategy={strategy}", *resume]),
            world=world)
        for rank in range(world):
            assert_holds(loaded[rank], expected, step=3)


@pytest.mark.slow
def test_single_process_checkpoint_loads_into_fsdp(overrides, tmp_path):
    run_dir = tmp_path / "run"
    spawn(tmp_path / "w", _trained, overrides(run_dir, 2, []), world=1)
    checkpoint = run_dir / "checkpoints" / "step-0000002"
    loaded = spawn(tmp_path / "r", _resumed, overrides(tmp_path / "to", 2, FSDP + [
        f"resume={checkpoint}"]))
    for rank in range(2):
        assert_holds(loaded[rank], saved(checkpoint), step=2)


@pytest.mark.slow
def test_stage2_resume_under_fsdp_is_exact(overrides, tmp_path):
    assert_resume_is_exact(tmp_path, "train_parti", lambda d: overrides(d, 6, FSDP), stop_at=3)
