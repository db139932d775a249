"""The shared trainer on stage 1: loss falls, checkpoints restore everything, exact resume, faults."""

from __future__ import annotations

import os
import shutil
import signal
import threading

import pytest
import torch

from parti.config import validate_vqgan
from parti.distributed.checkpoint import Checkpointer, export_weights, load_export, read_tensors
from parti.training import trainer as trainer_module
from parti.training.stage1 import VQGANTask
from parti.training.trainer import Trainer, start_run
from tests.conftest import compose_config, record_losses, tiny_vqgan_overrides


def build(shapes_dir, run_dir, steps=6, extra=()):
    cfg = compose_config("train_vqgan", tiny_vqgan_overrides(shapes_dir, run_dir, steps) + list(extra))
    run = start_run(cfg, validate_vqgan)
    task = VQGANTask(run)
    return Trainer(run, task), task


def weights(task) -> dict[str, torch.Tensor]:
    return {f"{unit}.{k}": v.clone() for unit, u in task.units.items()
            for k, v in u.module.state_dict().items()}


def test_a_few_steps_lower_the_loss(shapes_dir, tmp_path):
    trainer, task = build(shapes_dir, tmp_path, steps=30,
                          extra=["loss.disc_start=1000", "trainer.log_every=1"])
    losses = record_losses(task, "train/l2")
    metrics = trainer.fit()
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert {"eval/psnr", "eval/lpips", "eval/codebook_usage"} <= set(metrics)
    assert (tmp_path / "tb").is_dir() and (tmp_path / "config.yaml").is_file()


def test_checkpoint_restores_every_piece_of_state(shapes_dir, tmp_path):
    trainer, task = build(shapes_dir, tmp_path / "a", steps=4,
                          extra=["trainer.ema_decay=0.9", "trainer.precision=fp32"])
    loader_states = []
    save = trainer.save

    def recording_save(loader):
        loader_states.append(loader.state_dict())
        return save(loader)

    trainer.save = recording_save
    trainer.fit()
    saved = Checkpointer(tmp_path / "a", 3, trainer.run.dist).latest()
    assert saved is not None and saved.name == "step-0000004"
    fresh, fresh_task = build(shapes_dir, tmp_path / "a", steps=4, extra=["trainer.ema_decay=0.9"])
    assert fresh.resume() == saved
    assert fresh.step == 4 and fresh_task.disc_steps == task.disc_steps == 2
    for name, unit in task.units.items():
        other = fresh_task.units[name]
        for (k, v), v2 in zip(unit.module.state_dict().items(), other.module.state_dict().values()):
            assert torch.equal(v, v2), f"{name}.{k}"
        assert other.optimizer.state_dict()["state"].keys() == unit.optimizer.state_dict()["state"].keys()
        for state, state2 in zip(unit.optimizer.state_dict()["state"].values(),
                                 other.optimizer.state_dict()["state"].values()):
            assert all(torch.equal(state[k], state2[k]) for k in state)
        assert other.scheduler.state_dict() == unit.scheduler.state_dict()
        assert other.scaler.state_dict() == unit.scaler.state_dict()
    for v, v2 in zip(trainer.ema.state_dict().values(), fresh.ema.state_dict().values()):
        assert torch.equal(v, v2)
    assert fresh.loader_state == loader_states[-1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_ends_with_the_same_weights(shapes_dir, tmp_path, workers):
    extra = [f"data.num_workers={workers}", "model.dropout=0.1", "trainer.ckpt_every=3"]
    straight, straight_task = build(shapes_dir, tmp_path / "straight", steps=8, extra=extra)
    straight.fit()
    first, _ = build(shapes_dir, tmp_path / "resumed", steps=8, extra=extra)
    first.cfg.trainer.steps = 5  # the same run stopped after step 5 (the lr schedule still spans 8)
    first.fit()
    second, second_task = build(shapes_dir, tmp_path / "resumed", steps=8, extra=extra)
    assert second.resume().name == "step-0000005"
    second.fit()
    a, b = weights(straight_task), weights(second_task)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_a_checkpoint_and_stops(shapes_dir, tmp_path, signum):
    """SIGUSR1 is SLURM's warning before the time limit: it behaves like SIGTERM."""
    trainer, task = build(shapes_dir, tmp_path, steps=1000, extra=["loss.disc_start=1000"])
    original = task.train_step

    def step_then_signal(micro_batches, step):
        out = original(micro_batches, step)
        if step == 2:
            threading.Thread(target=os.kill, args=(os.getpid(), signum)).start()
            threading.Event().wait(0.2)
        return out

    task.train_step = step_then_signal
    assert trainer.fit() == {}
    latest = Checkpointer(tmp_path, 3, trainer.run.dist).latest()
    assert latest is not None and 3 <= int(latest.name.split("-")[1]) < 10


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_non_finite_steps_are_skipped_then_stop_the_run(shapes_dir, tmp_path, optim):
    # Adam is fused: the skip happens inside its kernel (no host read per step), and the streak is
    # checked when logging, so the run stops at the first log step after 3 bad steps in a row.
    # SGD skips on the host; both must leave every weight and optimizer moment untouched.
    trainer, task = build(shapes_dir, tmp_path, steps=20,
                          extra=["loss.disc_start=1000", "trainer.max_bad_steps=3",
                                 "trainer.log_every=5", "model.restart_every=0", f"optim={optim}"])
    unit = task.units["model"]
    assert unit.skips_on_device == (optim == "adam")
    before = {k: torch.nan_to_num(p.detach().clone()) for k, p in task.generator.named_parameters()}
    with torch.no_grad():
        task.generator.last_layer.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="5 consecutive steps with a non-finite"):
        trainer.fit()
    for name, param in task.generator.named_parameters():
        if param is not task.generator.last_layer:
            assert torch.equal(before[name], param.detach()), name
    assert torch.isnan(task.generator.last_layer).all()
    for state in unit.optimizer.state.values():
        assert all(not torch.is_tensor(v) or not v.any() for v in state.values())  # steps, moments
    assert trainer.bad_total == 5 and trainer.step == 5


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_non_finite_discriminator_steps_are_counted_and_logged(shapes_dir, tmp_path):
    # The critic trains from step 0 while the generator's GAN term is still off (warm-up), so
    # only the discriminator's updates are non-finite.
    trainer, task = build(shapes_dir, tmp_path, steps=4,
                          extra=["loss.disc_start=0", "loss.disc_warmup=1000",
                                 "trainer.log_every=2"])
    with torch.no_grad():
        next(task.units["disc"].module.parameters()).fill_(float("nan"))
    trainer.fit()
    assert task.disc_nonfinite == 4 and trainer.bad_total == 0
    assert task.extra_state()["disc_nonfinite"] == 4
    log = (tmp_path / "train.log").read_text()
    assert "disc/nonfinite_steps=2" in log and "disc/nonfinite_steps=4" in log


@pytest.mark.parametrize("image_every,drawn", [(0, []), (2, [2, 3])])
def test_image_grids_follow_image_every_and_close_the_run(shapes_dir, tmp_path, image_every,
                                                          drawn):
    """Every image_every steps and at the end; image_every=0 draws none, not even at the end."""
    trainer, task = build(shapes_dir, tmp_path, steps=3,
                          extra=["loss.disc_start=1000", f"trainer.image_every={image_every}"])
    steps = []
    task.log_images = lambda model, logger, step: steps.append(step)
    trainer.fit()
    assert steps == drawn


def test_keep_last_prunes_to_exactly_the_newest(shapes_dir, tmp_path):
    trainer, _ = build(shapes_dir, tmp_path, steps=5,
                       extra=["loss.disc_start=1000", "trainer.ckpt_every=1", "trainer.keep_last=2"])
    trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000004", "step-0000005"]


def test_resume_from_a_named_checkpoint_folder(shapes_dir, tmp_path):
    trainer, _ = build(shapes_dir, tmp_path / "a", steps=4,
                       extra=["loss.disc_start=1000", "trainer.ckpt_every=2"])
    trainer.fit()
    chosen = tmp_path / "a" / "checkpoints" / "step-0000002"
    again, _ = build(shapes_dir, tmp_path / "b", steps=4, extra=[f"resume={chosen}"])
    assert again.resume() == chosen and again.step == 2


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(shapes_dir, tmp_path):
    """Rolling a run back: its new history is saved (not skipped as already there) and the
    abandoned checkpoints are renamed, not deleted, so resume=auto continues the new one."""
    extra = ["loss.disc_start=1000", "trainer.ckpt_every=1", "trainer.keep_last=10"]
    build(shapes_dir, tmp_path, steps=4, extra=extra)[0].fit()
    root = tmp_path / "checkpoints"
    rolled_back, _ = build(shapes_dir, tmp_path, steps=4,
                           extra=[*extra, f"resume={root / 'step-0000002'}"])
    assert rolled_back.resume() == root / "step-0000002"
    aside = sorted(p.name.split(".")[0] for p in root.iterdir() if ".superseded-" in p.name)
    assert aside == ["step-0000003", "step-0000004"]
    assert Checkpointer(tmp_path, 10, rolled_back.run.dist).latest() == root / "step-0000002"
    rolled_back.fit()
    again, _ = build(shapes_dir, tmp_path, steps=4, extra=extra)
    assert again.resume() == root / "step-0000004" and again.step == 4
    assert all((root / p / "COMPLETE").is_file() for p in aside)


def test_optimizer_settings_at_a_resume_come_from_the_config(shapes_dir, tmp_path, monkeypatch):
    """The usual fix after a blow-up: resume with a lower lr. Moments and the schedule's position
    come from the checkpoint, lr / betas / weight decay from the config (a warning names them)."""
    warnings_ = []
    monkeypatch.setattr(trainer_module.log, "warning", warnings_.append)
    extra = ["loss.disc_start=1000", "optim.schedule=constant", "optim.weight_decay=0.01"]
    build(shapes_dir, tmp_path, steps=2, extra=extra)[0].fit()
    same, task = build(shapes_dir, tmp_path, steps=4, extra=extra)
    same.resume()
    assert warnings_ == []
    assert [g["lr"] for g in task.units["model"].optimizer.param_groups] == [1e-3, 1e-3]
    lower, task = build(shapes_dir, tmp_path, steps=4,
                        extra=[*extra, "lr=1e-4", "optim.weight_decay=0.1", "optim.betas=[0.5,0.9]"])
    lower.resume()
    assert warnings_[0] == ("model optimizer: from the config, not the checkpoint: betas "
                            "(0.9, 0.99) -> (0.5, 0.9), lr 0.001 -> 0.0001, weight_decay 0.01 -> 0.1")
    unit = task.units["model"]
    assert [g["lr"] for g in unit.optimizer.param_groups] == [1e-4, 1e-4]
    assert unit.scheduler.get_last_lr() == [1e-4, 1e-4] and unit.scheduler.last_epoch == 2
    assert [g["weight_decay"] for g in unit.optimizer.param_groups] == [0.1, 0.0]
    assert unit.optimizer.state  # the moments were restored
    lower.fit()


def test_a_resume_with_other_loader_settings_restarts_the_data_stream(shapes_dir, tmp_path):
    build(shapes_dir, tmp_path, steps=2, extra=["loss.disc_start=1000"])[0].fit()
    resumed, _ = build(shapes_dir, tmp_path, steps=3,
                       extra=["loss.disc_start=1000", "data.shuffle_buffer=16"])
    assert resumed.resume() is not None and resumed.loader_state is not None
    resumed.fit()
    assert resumed.step == 3
    log = (tmp_path / "train.log").read_text()
    assert ("the saved data position was taken with other loader settings (shuffle_buffer: saved "
            "32 now 16): the data stream starts afresh") in log


def test_a_checkpoint_of_the_other_stage_is_refused(shapes_dir, token_dir, tiny_tokenizer,
                                                    tmp_path):
    from tests.test_stage2 import build as build_stage2

    stage2, _ = build_stage2(shapes_dir, token_dir, tiny_tokenizer, tmp_path / "parti", steps=1)
    stage2.fit()
    ckpt = tmp_path / "parti" / "checkpoints" / "step-0000001"
    stage1, _ = build(shapes_dir, tmp_path / "vqgan", steps=2, extra=[f"resume={ckpt}"])
    with pytest.raises(ValueError, match="checkpoint of a parti model, but this run trains a "
                                         "vitvqgan model"):
        stage1.resume()


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(shapes_dir, tmp_path):
    first, _ = build(shapes_dir, tmp_path, steps=2, extra=["loss.disc_start=1000"])
    first.fit()
    second, task = build(shapes_dir, tmp_path, steps=4,
                         extra=["loss.disc_start=1000", "trainer.ema_decay=0.9"])
    second.resume()
    resumed = task.units["model"].module.state_dict()
    for key, value in second.ema.state_dict().items():
        assert torch.equal(value, resumed[key]), key


def test_resume_never_refuses_to_overwrite(shapes_dir, tmp_path):
    trainer, _ = build(shapes_dir, tmp_path, steps=2, extra=["loss.disc_start=1000"])
    trainer.fit()
    again, _ = build(shapes_dir, tmp_path, steps=2, extra=["resume=never"])
    with pytest.raises(RuntimeError, match="already holds checkpoints"):
        again.resume()


def test_truncated_checkpoint_is_reported(shapes_dir, tmp_path):
    trainer, _ = build(shapes_dir, tmp_path, steps=2, extra=["loss.disc_start=1000"])
    trainer.fit()
    state = tmp_path / "checkpoints" / "step-0000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    again, _ = build(shapes_dir, tmp_path, steps=4)
    with pytest.raises(RuntimeError, match="state.pt is damaged"):
        again.resume()


def test_damaged_tensors_and_old_format_checkpoints_are_reported(shapes_dir, tmp_path):
    trainer, _ = build(shapes_dir, tmp_path / "a", steps=2, extra=["loss.disc_start=1000"])
    trainer.fit()
    original = tmp_path / "a" / "checkpoints" / "step-0000002"
    cases = {"cut": "tensors in .* are damaged", "old": "checkpoint of an older parti"}
    for case, message in cases.items():
        copy = tmp_path / case / "checkpoints" / "step-0000002"
        shutil.copytree(original, copy)
        if case == "cut":
            shard = next((copy / "tensors").glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[:1000])
        else:
            shutil.rmtree(copy / "tensors")
        again, _ = build(shapes_dir, tmp_path / case, steps=4)
        with pytest.raises(RuntimeError, match=message):
            again.resume()


class Payload:
    """Any class a weights-only unpickler does not know: loading it could run code."""


def test_checkpoint_holding_arbitrary_objects_is_refused(shapes_dir, tmp_path):
    trainer, _ = build(shapes_dir, tmp_path, steps=2, extra=["loss.disc_start=1000"])
    trainer.fit()
    torch.save({"step": 2, "payload": Payload()},
               tmp_path / "checkpoints" / "step-0000002" / "state.pt")
    again, _ = build(shapes_dir, tmp_path, steps=4)
    with pytest.raises(RuntimeError, match="state.pt holds objects other than tensors"):
        again.resume()


def test_unfinished_checkpoint_is_ignored(shapes_dir, tmp_path):
    trainer, _ = build(shapes_dir, tmp_path, steps=2, extra=["loss.disc_start=1000"])
    trainer.fit()
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp-step-0000004").mkdir()
    (ckpts / "step-0000006").mkdir()  # no COMPLETE marker: a crash mid-write
    assert Checkpointer(tmp_path, 3, trainer.run.dist).latest().name == "step-0000002"


def test_export_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    export_weights(tmp_path / "export", model.state_dict(), {"kind": "test", "model": {"a": 1}})
    weights_, config = load_export(tmp_path / "export")
    assert config == {"kind": "test", "model": {"a": 1}}
    assert torch.equal(weights_["weight"], model.weight)
    with pytest.raises(FileNotFoundError, match="neither an export folder"):
        load_export(tmp_path)


def test_a_new_export_replaces_the_old_one_whole(tmp_path):
    export_weights(tmp_path / "export", {"w": torch.zeros(2)}, {"kind": "test"})
    export_weights(tmp_path / "export", {"w": torch.ones(3)}, {"kind": "test", "v": 2})
    weights_, config = load_export(tmp_path / "export")
    assert torch.equal(weights_["w"], torch.ones(3)) and config == {"kind": "test", "v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_checkpoint_files_reach_the_disk_before_the_marker(shapes_dir, tmp_path, monkeypatch):
    """Every file of a checkpoint is fsynced before COMPLETE is written, and the renamed folder's
    entry after: a crash cannot leave a marker in front of unflushed files."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    trainer, _ = build(shapes_dir, tmp_path, steps=1, extra=["loss.disc_start=1000"])
    trainer.fit()
    marker = next(i for i, p in enumerate(synced) if p.endswith("/COMPLETE"))
    written = {p.name for p in (tmp_path / "checkpoints" / "step-0000001").rglob("*")
               if p.is_file() and p.name != "COMPLETE"}
    assert {"state.pt", "rank-000.pt", ".metadata"} <= written
    assert written <= {os.path.basename(p) for p in synced[:marker]}
    assert str(tmp_path / "checkpoints") in synced[marker + 1:]


def test_a_checkpoint_folder_loads_its_ema_weights(shapes_dir, tmp_path):
    trainer, task = build(shapes_dir, tmp_path, steps=2, extra=["trainer.ema_decay=0.5"])
    trainer.fit()
    loaded, config = load_export(trainer.checkpointer.latest())
    assert config["kind"] == "vitvqgan"
    ema, trained = trainer.ema.state_dict(), task.units["model"].module.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert not all(torch.equal(loaded[k], trained[k]) for k in trained)


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_clean_names(shapes_dir, tmp_path):
    trainer, task = build(shapes_dir, tmp_path, steps=2,
                          extra=["trainer.compile=true", "loss.disc_start=1000"])
    losses = record_losses(task, "train/l2")
    trainer.fit()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    names = read_tensors(trainer.checkpointer.latest() / "tensors", ("units", "model", "model"))
    assert names.keys() == task.generator.state_dict().keys()
    assert not any("_orig_mod" in name for name in names)
