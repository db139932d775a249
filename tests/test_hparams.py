"""TensorBoard: each run logs its flattened config with its final metrics (HPARAMS), in its own
folder; sample grids carry their prompts."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from parti.config import validate_vqgan
from parti.eval.grid import LABEL_WIDTH
from parti.training.logging import RunLogger, flatten_hparams
from parti.training.stage1 import VQGANTask
from parti.training.trainer import Trainer, start_run
from tests.conftest import compose_config, tiny_vqgan_overrides


def test_flatten_keeps_scalars_and_writes_the_rest_as_strings():
    config = {"lr": 1e-4, "model": {"dim": 8, "disc": {"on": True}}, "betas": [0.9, 0.99],
              "name": "vqgan", "none": None}
    assert flatten_hparams(config) == {"lr": 1e-4, "model.dim": 8, "model.disc.on": True,
                                       "betas": "[0.9, 0.99]", "name": "vqgan", "none": "None"}


def test_a_run_logs_its_hparams_with_its_final_metrics(shapes_dir, tmp_path):
    cfg = compose_config("train_vqgan", tiny_vqgan_overrides(shapes_dir, tmp_path, steps=2))
    run = start_run(cfg, validate_vqgan)
    final = Trainer(run, VQGANTask(run)).fit()
    tb = tmp_path / "tb"
    assert [p for p in tb.iterdir() if p.is_dir()] == []  # no timestamped sub-run
    events = EventAccumulator(str(tb))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
    hparams = start.session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(1e-3)
    assert hparams["model.name"].string_value == "vitvqgan_tiny"
    assert hparams["trainer.steps"].number_value == 2
    assert hparams["optim.betas"].string_value == "[0.9, 0.99]"
    experiment = HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(final)
    assert "eval/psnr" in final
    # The metric values are the run's own final eval scalars.
    assert events.Scalars("eval/psnr")[-1].step == 2
    assert events.Scalars("eval/psnr")[-1].value == pytest.approx(final["eval/psnr"])


def test_sample_grids_carry_their_prompts(tmp_path):
    logger = RunLogger(tmp_path, enabled=True, total_steps=1, start_step=0, progress=False)
    prompts = ["a red circle", "a large blue square at the top left"]
    images = torch.full((2 * 3, 3, 16, 16), -1.0)
    images[:3] = 1.0  # the first prompt's row is white, the second's black
    logger.labelled_images("samples/prompts", images, prompts, step=5)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (grid,) = events.Images("samples/prompts")
    assert grid.step == 5
    assert (grid.width, grid.height) == (LABEL_WIDTH + 3 * (16 + 2), 2 * (24 + 2))
    pixels = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)).convert("L"))
    label, cells = pixels[:, :LABEL_WIDTH], pixels[:, LABEL_WIDTH:]
    assert (label[:26] < 128).any() and (label[26:] < 128).any()  # each row's prompt is written
    assert cells[:16, :16].min() == 255 and cells[26:42, :16].max() == 0  # beside its images


def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    """Steps 3-4 logged, the run killed and resumed from its step-2 checkpoint: TensorBoard shows
    each step once, with the resumed run's values."""
    first = RunLogger(tmp_path, enabled=True, total_steps=4, start_step=0, progress=False)
    for step in range(1, 5):
        first.scalars({"loss": float(step)}, step)
    first.close()
    resumed = RunLogger(tmp_path, enabled=True, total_steps=4, start_step=2, progress=False)
    for step in (3, 4):
        resumed.scalars({"loss": 10.0 * step}, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
